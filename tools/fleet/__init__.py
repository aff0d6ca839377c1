"""Workstation side of the fleet: talk to devices over MQTT (push, devices, watch, commands)."""
