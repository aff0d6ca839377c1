"""Link: the MQTT connection, the outbox that buffers what it sends, the prediction stream and HA discovery."""
