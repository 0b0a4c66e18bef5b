"""edgefleet on-device agent: follows desired state over MQTT, activates and measures models."""

__version__ = "0.1.0"
