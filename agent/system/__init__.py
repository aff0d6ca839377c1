"""System: what the agent tells the operating system and operators about itself (systemd notify, health, thermal)."""
