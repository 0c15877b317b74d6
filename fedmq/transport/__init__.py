"""MQTT transport: one link per session (MqttLink), TLS, the one-copy receive path."""
