"""The contract between workstation and device: bundle format, signing, MQTT topics and payloads.

Only stdlib, numpy and cryptography are imported here, so a device can use it; `tools/` imports it too.
"""
