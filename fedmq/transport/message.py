"""fedmq's own received message: what handlers see instead of paho's MQTTMessage.

paho's message is mutable, decodes its topic on every access and ties every handler to
paho's API; this one is frozen and plain, so handlers can be tested (and a selector loop
can feed them) without paho. The payload is the very bytes object the transport received:
building a Message never copies it (LeanClient's one-copy receive path stays one copy).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0  # the packet id a QoS 1 message is acknowledged by (MqttLink.ack)
    dup: bool = False  # the broker may have delivered it before
    # MQTT v5 properties fedmq reads: user properties in order, and what is left of the
    # sender's message expiry interval (None: it set none, or MQTT 3.1.1).
    user_properties: tuple[tuple[str, str], ...] = ()
    expiry_s: int | None = None
