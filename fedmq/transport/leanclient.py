"""paho's Client without the copies it makes of every received PUBLISH.

paho 2.x parses a PUBLISH by re-slicing the whole packet once per header field (topic,
packet id, and again per MQTT v5 property), so a 1 MB update is copied four to six times
before anyone sees it: ~0.9 ms per update, more than the aggregator needs to decode and
sum it, and enough to make a do-nothing paho subscriber the bottleneck of a local broker.
LeanClient cuts the payload off the packet with one copy and lets paho parse only the
small header that is left; the message paho builds then gets its payload back before any
callback sees it. QoS 2 messages, whose callback paho defers to PUBREL, take paho's own
path, and so does a packet too short for the header it announces (paho reports it
malformed). One difference: a property whose value runs past the properties length is
refused as malformed, where paho alone would read it out of the payload. paho's debug log
line for a received PUBLISH shows 0 bytes for split messages (it runs before the swap).
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

_QOS_MASK = 0x06
_HOOKS = ("_handle_publish", "_handle_on_message")


def publish_header_length(command: int, packet: bytes | bytearray, v5: bool) -> int | None:
    """Bytes of the PUBLISH variable header at the start of `packet` (everything after the
    fixed header): topic, packet id, properties. None if the packet is too short for the
    header it announces (paho then reports it malformed)."""
    pos = 2 + int.from_bytes(packet[:2], "big")
    if (command & _QOS_MASK) >> 1:
        pos += 2
    if v5:
        length, shift = 0, 0
        for step in range(4):  # properties length: a variable byte integer
            if pos + step >= len(packet):
                return None
            byte = packet[pos + step]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                pos += step + 1 + length
                break
        else:
            return None
    return pos if pos <= len(packet) else None


class LeanClient(mqtt.Client):
    """A paho Client whose received PUBLISH payloads are copied once, not once per field."""

    # Whether this paho has the hooks we rely on; without them LeanClient is plain paho.
    supported = all(hasattr(mqtt.Client, name) for name in _HOOKS)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_payload: bytes | None = None
        self._retry = threading.Event()  # retry_now(): end the backoff wait at once
        self._lean = self.supported
        self.split_publishes = 0  # messages delivered through the one-copy path

    def use_mqtt311(self, *, clean_session: bool) -> None:
        """Speak MQTT 3.1.1 from the next CONNECT on (a broker refused MQTT 5). paho fixes
        the version in its constructor; it reads these two attributes anew for every
        CONNECT, subscription and PUBLISH, so switching between connections is safe. The
        one-copy receive path follows: publish_header_length is told the version."""
        self._protocol = mqtt.MQTTv311
        self._clean_session = clean_session

    def retry_now(self) -> None:
        """The way to the broker is back (a simulated link restored): end the reconnect
        backoff now and start it afresh, instead of sleeping out up to 30 s of it."""
        self._retry.set()

    def _reconnect_wait(self) -> None:
        """paho's backoff wait (the same doubling delay, the same exits), made to end early
        on retry_now(); paho's own sleeps in 1 s slices that nothing can cut short."""
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:
                self._reconnect_delay = self._reconnect_min_delay
            else:
                self._reconnect_delay = min(self._reconnect_delay * 2, self._reconnect_max_delay)
            target = time.monotonic() + self._reconnect_delay
        waiting = (mqtt._ConnectionState.MQTT_CS_DISCONNECTING,
                   mqtt._ConnectionState.MQTT_CS_DISCONNECTED)
        while self._state not in waiting and not self._thread_terminate:
            remaining = target - time.monotonic()
            if remaining <= 0 or self._retry.wait(min(remaining, 1.0)):
                break
        if self._retry.is_set():
            self._retry.clear()
            with self._reconnect_delay_mutex:
                self._reconnect_delay = None

    def use_mqtt5(self) -> None:
        """Speak MQTT 5 again from the next CONNECT on (a 3.1.1 trial that nobody answered
        either); the session settings of 5 travel with connect()'s properties, kept."""
        self._protocol = mqtt.MQTTv5

    def aim(self, host: str, port: int) -> None:
        """Make paho's next reconnect go to host:port (failing over to another broker).
        paho's own host/port setters refuse while its state still says connected, which it
        does inside on_disconnect, after the socket is already closed; reconnect() reads
        these two attributes afresh."""
        self._host, self._port = host, port

    def _handle_publish(self):  # runs on paho's network thread
        packet = self._in_packet["packet"]
        command = self._in_packet["command"]
        if (command & _QOS_MASK) >> 1 not in (0, 1) or not self._lean:  # 2, or invalid 3
            return super()._handle_publish()
        head = publish_header_length(command, packet, self._protocol == mqtt.MQTTv5)
        if head is None:
            return super()._handle_publish()
        self._split_payload = bytes(memoryview(packet)[head:])
        self._in_packet["packet"] = packet[:head]
        try:
            rc = super()._handle_publish()
        except BaseException:  # malformed header: paho raised before delivering anything
            self._split_payload = None
            raise
        if self._split_payload is not None:
            # paho returned without delivering through _handle_on_message: a paho that no
            # longer works this way would hand out empty payloads. Stop splitting.
            self._split_payload = None
            self._lean = False
            log.error("paho did not deliver a PUBLISH through _handle_on_message; using "
                      "paho's own parsing from now on")
        return rc

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        if self._split_payload is not None:
            message.payload, self._split_payload = self._split_payload, None
            self.split_publishes += 1
        super()._handle_on_message(message)
