"""Delivery: the on-device model store and the updater that receives, verifies and activates pushed bundles."""
