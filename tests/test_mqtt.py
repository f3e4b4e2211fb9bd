"""``edgetl run --mqtt URL --topic T`` against a real broker (issue 14): Debian's mosquitto started
here on 127.0.0.1 (a free port, anonymous, no persistence) and a paho subscriber. The messages must
be the JSON lines ``--headless`` prints, byte for byte and as many; a broker that is not there is a
one-line error before anything runs; a broker killed mid-run never stops the run, which counts what
it dropped and reconnects when the broker is back. Without mosquitto or paho-mqtt the tests skip,
naming the set-up line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from _mqtt import Broker, Subscriber, broker_missing, free_port
from _tinyartifact import make_tiny_artifact, write_video
from test_streams import Run, summary

pytestmark = pytest.mark.skipif(broker_missing() is not None, reason=str(broker_missing()))
TOPIC = "edgetl/test/line1"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_tiny_artifact(tmp_path_factory.mktemp("art") / "tiny")


@pytest.fixture
def broker():
    with Broker() as b:
        yield b


def edgetl(*args, timeout: float = 120, code: str = "") -> subprocess.CompletedProcess:
    code = code + "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "EDGETL_VERBOSE": ""})


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr and "hint:" in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize("case", ["every result", "events", "two sources", "qos 1"])
def test_the_messages_are_the_json_lines(tmp_path, artifact, broker, case):
    videos = [write_video(tmp_path / "a.avi", n=40), write_video(tmp_path / "b.avi", n=25)]
    args = ["-s", videos[0], "--headless", "--mqtt", broker.url, "--topic", TOPIC,
            "--summary-json", tmp_path / "s.json"]
    if case == "events":
        args.append("--events")
    if case == "two sources":
        args += ["-s", f"belt={videos[1]}"]
    if case == "qos 1":
        args += ["--mqtt-qos", "1"]
    sub = Subscriber(broker.port, TOPIC)
    try:
        r = edgetl("run", artifact, *args)
        assert r.returncode == 0, r.stderr
        want = r.stdout.splitlines()
        got = sub.wait_for(len(want))
    finally:
        sub.close()
    assert got == want  # the same objects, byte for byte, in the same order
    objs = [json.loads(m) for m in got]
    if case == "events":
        assert 3 <= len(got) < 40 and [o["label"] for o in objs][:2] == ["dark", "bright"]  # label changes only
    elif case == "two sources":
        assert len(got) == 65 and {o["source"] for o in objs} == {"0", "belt"}
        assert [o["frame"] for o in objs if o["source"] == "belt"] == list(range(25))
    else:
        assert len(got) == 40 and [o["frame"] for o in objs] == list(range(40))
    m = summary(tmp_path / "s.json")["mqtt"]
    assert m["messages"] == m["sent"] == len(want) and m["dropped"] == m["lost"] == m["unsent"] == 0, m
    assert m["qos"] == (1 if case == "qos 1" else 0) and m["url"] == broker.url and m["topic"] == TOPIC
    assert f"mqtt {broker.url} topic '{TOPIC}'" in r.stderr and f"{len(want)} sent, 0 dropped" in r.stderr


def test_an_unreachable_broker_is_one_line_and_nothing_is_written(tmp_path, artifact):
    video = write_video(tmp_path / "v.avi", n=10)
    out = tmp_path / "out"
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    r = edgetl("run", artifact, "-s", video, "--headless", "--mqtt", url, "--topic", TOPIC,
               "--save", out / "annotated.mp4", "--summary-json", out / "s.json")
    err = one_line_error(r)
    assert f"error: --mqtt {url}: cannot connect to the broker (Connection refused)" in err
    assert "start the broker" in err and r.stdout == ""
    assert not out.exists() or not any(out.iterdir())  # no video, no partial video, no summary


def test_a_broker_that_refuses_the_login_is_one_line(tmp_path, artifact):
    video = write_video(tmp_path / "v.avi", n=5)
    with Broker() as b:
        b.stop()
        b.conf.write_text(b.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
        b.start()
        r = edgetl("run", artifact, "-s", video, "--headless", "--mqtt", f"mqtt://edge:s3cret@127.0.0.1:{b.port}",
                   "--topic", TOPIC)
    err = one_line_error(r)
    assert "the broker refused the connection (Not authorized)" in err and "s3cret" not in err
    assert f"mqtt://edge:***@127.0.0.1:{b.port}" in err


def test_a_port_that_is_no_broker_is_given_up(artifact):
    """A service that accepts the TCP connection and never answers the MQTT login."""
    from edgetl.runtime.errors import EdgetlError
    from edgetl.runtime.mqtt import MqttPublisher

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        t0 = time.monotonic()
        with pytest.raises(EdgetlError) as exc:
            MqttPublisher(f"mqtt://127.0.0.1:{srv.getsockname()[1]}", TOPIC, connect_timeout=0.5,
                          note=lambda m: None).start()
    assert "did not answer the MQTT login within 0.5 s" in exc.value.message and time.monotonic() - t0 < 5


@pytest.mark.parametrize("args,msg", [
    (["--mqtt", "mqtt://127.0.0.1"], "--mqtt needs --topic"),
    (["--topic", TOPIC], "--topic is given without --mqtt"),
    (["--mqtt", "http://127.0.0.1:1883", "--topic", TOPIC], "not an mqtt:// URL"),
    (["--mqtt", "127.0.0.1:1883", "--topic", TOPIC], "not an mqtt:// URL"),
    (["--mqtt", "mqtts://127.0.0.1", "--topic", TOPIC], "mqtts:// is not supported"),
    (["--mqtt", "mqtt://127.0.0.1:abc", "--topic", TOPIC], "the port is not a number"),
    (["--mqtt", "mqtt://127.0.0.1:0", "--topic", TOPIC], "the port is not a number"),
    (["--mqtt", "mqtt://:1883", "--topic", TOPIC], "no host"),
    (["--mqtt", "mqtt://127.0.0.1/plant/line1", "--topic", TOPIC], "put the topic in --topic"),
    (["--mqtt", "mqtt://127.0.0.1", "--topic", "plant/#"], "wildcards"),
    (["--mqtt", "mqtt://127.0.0.1", "--topic", ""], "an empty topic"),
    (["--mqtt", "mqtt://127.0.0.1", "--topic", TOPIC, "--mqtt-qos", "2"], "--mqtt-qos"),
])
def test_bad_mqtt_options_are_one_line(tmp_path, artifact, args, msg):
    video = write_video(tmp_path / "v.avi", n=3)
    r = edgetl("run", artifact, "-s", video, "--headless", *args, timeout=60)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert r.stdout == ""


def test_without_paho_the_extra_is_named(tmp_path, artifact):
    video = write_video(tmp_path / "v.avi", n=3)
    r = edgetl("run", artifact, "-s", video, "--headless", "--mqtt", "mqtt://127.0.0.1", "--topic", TOPIC,
               code="import sys\nsys.modules['paho'] = None\n")  # as if paho-mqtt were not installed
    err = one_line_error(r)
    assert "edgetl run --mqtt needs the Python package 'paho-mqtt' (edgetl[mqtt])" in err
    assert "pip install 'edgetl[mqtt]'" in err


@pytest.mark.parametrize("qos", [0, 1])
def test_a_broker_killed_mid_run_never_stops_the_run(tmp_path, artifact, qos):
    """The broker is killed (SIGKILL) after 30 results and restarted on the same port 1.5 s later:
    the run keeps its pace and ends normally; QoS 0 drops (and counts) the messages of the outage,
    QoS 1 queues them and delivers them after the reconnection."""
    video = write_video(tmp_path / "v.avi", n=270, fps=30.0)  # 9 s played like a camera
    with Broker() as b:
        sub = Subscriber(b.port, TOPIC)
        run = Run(sys.executable, artifact, "-s", video, "--realtime", "--headless", "--mqtt", b.url, "--topic",
                  TOPIC, "--mqtt-qos", qos, "--summary-json", tmp_path / "s.json")
        try:
            run.wait_lines(30)
            b.kill()
            t_kill = time.time()
            time.sleep(1.5)
            b.start()
            t_back = time.time()
            assert run.finish(60) == 0, run.err
            lines = [o for _, o in run.lines]
            got = [json.loads(m) for m in sub.wait_for(len(lines), timeout=10)]
        finally:
            run.proc.kill()
            sub.close()
    s = summary(tmp_path / "s.json")
    m = s["mqtt"]
    assert s["frames"] == len(lines) == m["messages"] and s["stop_reason"] == "end of source"
    assert m["disconnects"] == 1 and m["reconnects"] == 1 and m["connected_at_end"], m
    assert "MQTT: lost the broker" in run.err and "MQTT: reconnected to" in run.err
    frames = {o["frame"] for o in lines}
    assert {o["frame"] for o in got} <= frames  # what arrived is what was printed
    after = [o["frame"] for o in lines if o["t"] > t_back + 4.0]  # both sides reconnected by then
    assert after and set(after) <= {o["frame"] for o in got}
    gaps = [b["t"] - a["t"] for a, b in zip(lines, lines[1:])]
    assert max(gaps) < 1.0, max(gaps)  # the frame loop never waited on the broker
    if qos == 0:
        assert m["dropped"] >= 10 and m["sent"] + m["dropped"] + m["lost"] == m["messages"], m
        assert f"{m['dropped']} dropped" in run.err
    else:  # queued through the outage, delivered after it
        assert m["dropped"] == 0 and m["unsent"] == 0 and m["sent"] == m["messages"], m
        outage = [o["frame"] for o in lines if t_kill + 0.3 < o["t"] < t_back]
        assert len(outage) >= 20 and set(outage) <= {o["frame"] for o in got}


def test_a_lost_broker_never_blocks_a_library_run(tmp_path, artifact, monkeypatch):
    """run_app with a broker that dies right after the connection: every frame is processed, every
    message counted as dropped."""
    import io

    from edgetl import runtime as rt
    from edgetl.runtime import mqtt as mq
    from edgetl.runtime.app import AppOptions, StreamOptions, run_app

    video = write_video(tmp_path / "v.avi", n=60)
    model = rt.load(artifact)
    notes = io.StringIO()
    with Broker() as b:
        start = mq.MqttPublisher.start

        def start_then_kill(self):
            start(self)
            b.kill()
            t_end = time.monotonic() + 5
            while self.connected and time.monotonic() < t_end:  # paho's thread sees the connection close
                time.sleep(0.01)
            return self

        monkeypatch.setattr(mq.MqttPublisher, "start", start_then_kill)
        s = run_app(model, str(video), StreamOptions(), AppOptions(headless=True, mqtt=b.url, mqtt_topic=TOPIC),
                    out=io.StringIO(), err=notes)
    model.close()
    m = s["mqtt"]
    assert s["frames"] == 60 and m["messages"] == 60 and m["dropped"] == 60 and m["disconnects"] == 1, m
    assert not m["connected_at_end"] and "lost the broker" in notes.getvalue()
