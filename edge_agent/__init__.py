"""fedmq edge agent: trains on local data and publishes model updates over MQTT.

The wire protocol and codecs live here because both the agent and the aggregator need
them, and the agent must install on its own with only paho-mqtt, numpy and msgpack.
"""

__version__ = "0.1.0"
