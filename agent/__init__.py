"""edgecv device agent: camera → preprocess → int8 runtime → MQTT, plus the bundle/MQTT contract."""

__version__ = "0.1.0"
