"""``edgetl run --mqtt mqtt://HOST[:PORT] --topic T``: the run's JSON lines, published to an MQTT broker.

Each message is one JSON object, byte for byte the line ``--headless`` prints (without the newline):
per result, or with ``--events`` per event; with several sources each carries ``"source"``. The
client is paho-mqtt (``pip install 'edgetl[mqtt]'``), imported only when ``--mqtt`` is given.

* At start the broker must answer (TCP connection and CONNACK within ``connect_timeout`` s), else
  the run stops before any frame with a one-line error (exit 2) and writes nothing.
* Publishing never waits on the network: paho's own thread writes to the socket and reconnects
  with back-off (1 s, doubling to 10 s) when the broker is lost; the frame loop only hands a
  message over. While the broker is away, QoS 0 messages are dropped and QoS 1 messages queue (up
  to ``max_pending``, then they are dropped too); a broker that stops reading meets the same bound,
  so memory stays bounded whatever the broker does. Everything is counted: the run's summary says
  how many messages were sent, dropped while the broker was away, lost with the connection, and
  left unsent at the end.
* URL credentials (``mqtt://USER:PASSWORD@HOST``) are used for the broker's login and shown as
  ``USER:***@`` everywhere. TLS (``mqtts://``) and websockets are not supported.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit

from .errors import EdgetlError, missing_dependency
from .sources import Note, redact_uri, stderr_note

DEFAULT_PORT = 1883
MAX_PENDING = 1000  # messages handed over and not yet written (QoS 0) / acknowledged (QoS 1)
CONNECT_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 2.0  # at the end: how long the messages still queued get to leave
KEEPALIVE_S = 30
URL_HINT = "give mqtt://HOST[:PORT] (port 1883 when none is given), e.g. --mqtt mqtt://127.0.0.1:1883"


def parse_mqtt_url(text: str) -> Tuple[str, int, Optional[str], Optional[str]]:
    """``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` -> (host, port, user, password)."""
    raw = str(text).strip()
    shown = redact_uri(raw)
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise EdgetlError(f"--mqtt {shown!r}: the port is not a number in 1-65535", hint=URL_HINT) from None
    scheme = parts.scheme.lower()
    if scheme in ("mqtts", "ssl", "tls", "ws", "wss"):
        raise EdgetlError(f"--mqtt {shown!r}: {scheme}:// is not supported (plain MQTT over TCP only)",
                          hint="give mqtt://HOST[:PORT]; for TLS, run a local bridge (e.g. mosquitto's) to the remote broker")
    if scheme != "mqtt" or not parts.netloc:
        raise EdgetlError(f"--mqtt {shown!r}: not an mqtt:// URL", hint=URL_HINT)
    if not parts.hostname:
        raise EdgetlError(f"--mqtt {shown!r}: no host", hint=URL_HINT)
    if port == 0:
        raise EdgetlError(f"--mqtt {shown!r}: the port is not a number in 1-65535", hint=URL_HINT)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EdgetlError(f"--mqtt {shown!r}: a path or query is not part of an MQTT address",
                          hint="put the topic in --topic, e.g. --mqtt mqtt://10.0.0.2 --topic plant/line1")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port or DEFAULT_PORT, user, password


def check_topic(topic: Optional[str]) -> str:
    """A topic to publish to: not empty, no wildcard (``+``, ``#``), no NUL, at most 65535 bytes."""
    hint = "give a topic name such as plant/line1/edgetl (no + or #)"
    if topic is None or not str(topic).strip():
        raise EdgetlError("--topic: an empty topic", hint=hint)
    topic = str(topic)
    if "+" in topic or "#" in topic:
        raise EdgetlError(f"--topic {topic!r}: + and # are subscription wildcards, not allowed in a topic to "
                          "publish to", hint=hint)
    if "\0" in topic or len(topic.encode("utf-8")) > 65535:
        raise EdgetlError(f"--topic {topic[:80]!r}: not a valid MQTT topic (a NUL, or over 65535 bytes)", hint=hint)
    return topic


def check_options(url: Optional[str], topic: Optional[str], qos: int = 0) -> None:
    """``--mqtt``/``--topic``/``--mqtt-qos`` together, checked before anything loads."""
    if url is None:
        if topic is not None:
            raise EdgetlError("--topic is given without --mqtt", hint="add --mqtt mqtt://HOST[:PORT], or leave out --topic")
        return
    parse_mqtt_url(url)
    if topic is None:
        raise EdgetlError("--mqtt needs --topic", hint="add the topic to publish to, e.g. --topic plant/line1/edgetl")
    check_topic(topic)
    if int(qos) not in (0, 1):
        raise EdgetlError(f"--mqtt-qos {qos}: not 0 or 1", hint="0: at most once (dropped while the broker is away), "
                                                              "1: at least once (queued while the broker is away)")


def _paho() -> Any:
    try:
        import paho.mqtt.client as client
    except ImportError as exc:
        err = missing_dependency(getattr(exc, "name", None) or "paho", "edgetl run --mqtt")
        if err is None:
            raise
        raise err from None
    return client


class MqttPublisher:
    """Publishes text messages to one topic from the frame loop, without waiting on the network.

    ``start()`` connects (or raises an EdgetlError); ``publish(text)`` hands a message to paho's
    thread or counts it as dropped; ``close()`` gives the queued messages ``FLUSH_TIMEOUT_S`` to
    leave, disconnects and returns :meth:`summary`."""

    def __init__(self, url: str, topic: str, qos: int = 0, note: Note = stderr_note,
                 max_pending: int = MAX_PENDING, connect_timeout: float = CONNECT_TIMEOUT_S):
        check_options(url, topic, qos)
        self.host, self.port, self._user, self._password = parse_mqtt_url(url)
        self.url = redact_uri(str(url).strip())
        self.topic, self.qos = topic, int(qos)
        self.note, self.max_pending, self.connect_timeout = note, int(max_pending), float(connect_timeout)
        self.mqtt = _paho()
        self.client: Any = None
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._refused: Optional[str] = None
        self._closing = False
        self.connected = False
        self.messages = 0  # handed to publish()
        self.pending = 0  # queued in paho: not yet written (QoS 0) / not yet acknowledged (QoS 1)
        self.sent = 0  # written to the socket (QoS 0) / acknowledged by the broker (QoS 1)
        self.dropped = 0  # never queued: the broker was away (QoS 0) or the queue was full
        self.lost = 0  # queued, then lost with the connection before they were written (QoS 0)
        self.unsent = 0  # still queued when the run ended
        self.disconnects = 0
        self.reconnects = 0
        self.connected_at_end = False
        self._lost_at = 0.0
        self._dropped_at_loss = 0

    # -- lifecycle
    def start(self) -> "MqttPublisher":
        mqtt = self.mqtt
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgetl-{os.getpid()}-{os.urandom(3).hex()}",
                             protocol=mqtt.MQTTv311)
        client.connect_timeout = self.connect_timeout
        client.max_queued_messages_set(self.max_pending)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if self._user is not None:
            client.username_pw_set(self._user, self._password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise EdgetlError(f"--mqtt {self.url}: cannot connect to the broker ({why})",
                              hint="start the broker (mosquitto listens on port 1883) or correct the host and port; "
                                   "the run starts only once the broker answers") from None
        client.loop_start()
        if not self._connack.wait(self.connect_timeout) or self._refused is not None:
            refused = self._refused
            self._stop_loop()
            if refused is None:
                raise EdgetlError(f"--mqtt {self.url}: the broker accepted the connection but did not answer the MQTT "
                                  f"login within {self.connect_timeout:g} s",
                                  hint="check that HOST:PORT is an MQTT broker (not another service)")
            raise EdgetlError(f"--mqtt {self.url}: the broker refused the connection ({refused})",
                              hint="check the user name and password (mqtt://USER:PASSWORD@HOST) and the broker's "
                                   "access rules")
        self.note(f"publishing to {self.url} topic {self.topic!r} (QoS {self.qos})")
        return self

    def close(self) -> Dict[str, Any]:
        """Let the queued messages leave (at most FLUSH_TIMEOUT_S while connected), disconnect, summarise."""
        if self.client is None:
            return self.summary()
        t_end = time.monotonic() + FLUSH_TIMEOUT_S
        while self.connected and self.pending > 0 and time.monotonic() < t_end:
            time.sleep(0.01)
        with self._lock:
            self._closing = True
            self.unsent = self.pending
            self.connected_at_end = self.connected
        if self.unsent:
            self.note(f"MQTT: {self.unsent} messages were still queued for {self.url} at the end and are not sent")
        self._stop_loop()
        return self.summary()

    def _stop_loop(self) -> None:
        """Disconnect and stop paho's thread, never waiting more than a few seconds (a broker that
        stopped reading can hold the last packets)."""
        client, self.client = self.client, None
        if client is None:
            return
        self._closing = True
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 (a socket error while leaving: nothing to do about it)
            pass
        t = threading.Thread(target=client.loop_stop, name="edgetl-mqtt-stop", daemon=True)
        t.start()
        t.join(3.0)

    # -- the frame loop's side
    def publish(self, text: str) -> bool:
        """Hand one message to paho's thread (True), or count it as dropped (False). Never blocks on the network."""
        client = self.client
        with self._lock:
            self.messages += 1
            if client is None or self.pending >= self.max_pending or (self.qos == 0 and not self.connected):
                self.dropped += 1
                return False
            self.pending += 1
        rc = client.publish(self.topic, text, qos=self.qos).rc
        ok = rc == self.mqtt.MQTT_ERR_SUCCESS or (self.qos > 0 and rc == self.mqtt.MQTT_ERR_NO_CONN)  # QoS 1: queued
        if not ok:
            with self._lock:
                self.pending -= 1
                self.dropped += 1
        return ok

    # -- paho's thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self._refused = str(reason_code)
            self._connack.set()
            return
        with self._lock:
            self.connected = True
            again = self._connack.is_set()
            if again:
                self.reconnects += 1
                dropped = self.dropped - self._dropped_at_loss
        self._connack.set()
        if again:
            self.note(f"MQTT: reconnected to {self.url} after {time.monotonic() - self._lost_at:.1f} s; "
                      f"{dropped} messages dropped meanwhile")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._lock:
            was = self.connected
            self.connected = False
            if self._closing or not was:
                return
            self.disconnects += 1
            self._lost_at, self._dropped_at_loss = time.monotonic(), self.dropped
            if self.qos == 0:  # the QoS 0 packets not written yet go with the connection
                self.lost += self.pending
                self.pending = 0
        what = ("messages are dropped meanwhile (QoS 0)" if self.qos == 0 else
                f"messages are queued meanwhile (QoS 1, up to {self.max_pending}, then dropped)")
        why = str(reason_code)
        why = "" if why in ("Unspecified error", "Success") else f" ({why})"  # paho's words for a closed socket
        self.note(f"MQTT: lost the broker {self.url}{why}; the run goes on and reconnects; {what}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self.sent += 1
            self.pending = max(0, self.pending - 1)

    # -- reporting
    def summary(self) -> Dict[str, Any]:
        return {"url": self.url, "topic": self.topic, "qos": self.qos, "messages": self.messages, "sent": self.sent,
                "dropped": self.dropped, "lost": self.lost, "unsent": self.unsent, "disconnects": self.disconnects,
                "reconnects": self.reconnects, "connected_at_end": self.connected_at_end}


def format_mqtt_summary(m: Dict[str, Any]) -> str:
    """The summary's MQTT line."""
    line = (f"  mqtt {m['url']} topic {m['topic']!r} (QoS {m['qos']}): {m['messages']} messages, {m['sent']} sent, "
            f"{m['dropped']} dropped")
    if m["lost"]:
        line += f", {m['lost']} lost with the connection"
    if m["unsent"]:
        line += f", {m['unsent']} unsent at the end"
    if m["disconnects"]:
        line += (f"; the broker was lost {m['disconnects']} time{'s' if m['disconnects'] > 1 else ''}, "
                 f"reconnected {m['reconnects']} time{'s' if m['reconnects'] != 1 else ''}")
    return line
