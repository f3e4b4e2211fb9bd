"""A real MQTT broker for the tests and the soak benchmark: Debian's mosquitto (``.ci/system-deps.sh``)
as a subprocess on 127.0.0.1 with a free port and a tiny config; ``kill()`` (SIGKILL, like a crash)
and ``start()`` again on the same port; and a paho subscriber that collects what arrives."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from _streams import ManagedProcess

MOSQUITTO = os.environ.get("EDGETL_MOSQUITTO", shutil.which("mosquitto") or "/usr/sbin/mosquitto")
SETUP = "run `sudo make system-deps` (Debian's mosquitto, see .ci/system-deps.sh) or set EDGETL_MOSQUITTO"


def broker_missing() -> Optional[str]:
    """None when mosquitto and paho-mqtt are here, else why not (a skip reason)."""
    if not os.path.exists(MOSQUITTO):
        return f"no MQTT broker at {MOSQUITTO}: {SETUP}"
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return "paho-mqtt is not installed: pip install 'edgetl[mqtt]' (the dev extra has it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker(ManagedProcess):
    """mosquitto on 127.0.0.1:``port`` (anonymous, no persistence), stopped by ``__exit__``."""

    def __init__(self, port: int = 0):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgetl-mqtt-"))
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "max_queued_messages 0\nlog_dest none\n")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}")

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Subscriber:
    """A paho client subscribed (QoS 1) to ``topic``; ``messages`` holds the payloads as text, in
    arrival order. It resubscribes after a reconnect (a broker restarted on the same port)."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.messages: List[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgetl-test-{os.getpid()}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the test subscriber could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(msg.payload.decode("utf-8"))

    def wait_for(self, n: int, timeout: float = 20.0) -> List[str]:
        t_end = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < t_end:
            time.sleep(0.02)
        time.sleep(0.2)  # and nothing more comes
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
