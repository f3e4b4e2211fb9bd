"""``edgetl run --serve HOST:PORT``: what the run sees, over HTTP (stdlib only).

* ``/``: a status page: per source its state, FPS, latency p50/p90, the last label (or counts),
  drops and reconnects, and its annotated stream (refreshed every second from ``/status.json``);
* ``/stream/NAME.mjpg`` (``/stream.mjpg``: the first source): the annotated frames as MJPEG
  (``multipart/x-mixed-replace``), at most ``max_fps`` per source; frames are drawn and encoded
  only while someone watches;
* ``/snapshot/NAME.jpg``: the next annotated frame as one JPEG;
* ``/status.json``: the page's numbers; ``/health``: ``{"ok", "sources": {NAME: {"state",
  "delivering", "last_frame_age_s"}}}``, HTTP 200 when every source delivers, else 503.

The address defaults to 127.0.0.1 (``--serve 8080`` or ``--serve :8080``); ``0.0.0.0:8080``
opens it to the network (no authentication: put it behind a proxy for that).
"""

from __future__ import annotations

import collections
import html
import http.server
import json
import socket
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import cv2

from .errors import EdgetlError
from .sources import Note, stderr_note

BOUNDARY = "edgetlframe"


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1); ``[::1]:PORT`` for IPv6. Port 0: any free port."""
    raw = str(text).strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "", raw
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EdgetlError(f"--serve {text!r}: {port!r} is not a port number",
                          hint="give HOST:PORT, e.g. --serve 127.0.0.1:8080 (or --serve 8080 for 127.0.0.1)")
    if any(ch.isspace() or ch in "/?#@" for ch in host):
        raise EdgetlError(f"--serve {text!r}: {host!r} is not a host name or address",
                          hint="give HOST:PORT, e.g. --serve 127.0.0.1:8080 or --serve 0.0.0.0:8080")
    return host, int(port)


class _Feed:
    """One source as the server sees it: the last JPEG, the last result's fields, a recent FPS."""

    def __init__(self, name: str, lane: Any):
        self.name, self.lane = name, lane
        self.cond = threading.Condition()
        self.jpeg: Optional[bytes] = None
        self.seq = 0
        self.t_jpeg = 0.0
        self.last: Dict[str, Any] = {}
        self.times: Deque[float] = collections.deque(maxlen=1024)  # result times, for the FPS over the last 2 s

    def fps(self, window: float = 2.0) -> float:
        now = time.perf_counter()
        recent = [t for t in list(self.times) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


class StatusServer:
    """The HTTP side of ``--serve``; ``observe(r)`` for every result, ``publish`` when ``watched()``."""

    def __init__(self, stream: Any, address: str, note: Note = stderr_note, max_fps: float = 15.0, quality: int = 80):
        self.host, self.port = parse_address(address)
        self.stream, self.note = stream, note
        self.max_fps, self.quality = float(max_fps), int(quality)
        lanes = getattr(stream, "lanes", None)
        self.feeds: Dict[str, _Feed] = ({lane.name: _Feed(lane.name, lane) for lane in lanes} if lanes is not None
                                        else {"0": _Feed("0", None)})
        self.order = list(self.feeds)
        self.clients = 0
        self._wanted_until = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.httpd: Optional[http.server.ThreadingHTTPServer] = None

    # -- lifecycle
    def start(self) -> "StatusServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_Server", (http.server.ThreadingHTTPServer,),
                          {"address_family": family, "daemon_threads": True, "allow_reuse_address": True})
        try:
            self.httpd = server_cls((self.host, self.port), _handler(self))
        except OSError as exc:
            raise EdgetlError(f"--serve {self.host}:{self.port}: cannot listen there ({exc.strerror or exc})",
                              hint="choose another port (or 0 for any free one), or a local address of this device")
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="edgetl-serve",
                         daemon=True).start()
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/"
        self.note(f"serving {self.url} (status page), {self.url}stream/NAME.mjpg, {self.url}health")
        return self

    def close(self) -> None:
        self._closed.set()
        for feed in self.feeds.values():
            with feed.cond:
                feed.cond.notify_all()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    # -- the run's side
    def _feed(self, name: Optional[str]) -> _Feed:
        return self.feeds["0" if name is None else name]

    def observe(self, r: Any) -> None:
        """Every result: its label (or counts), score, latency, and the source's recent FPS."""
        feed = self._feed(r.source)
        feed.times.append(time.perf_counter())
        last = {"frame": r.frame_index, "label": r.label, "score": round(float(r.score), 4),
                "latency_ms": round(r.latency_ms, 2), "time": round(r.time, 3)}
        if r.counts is not None:
            last["counts"] = dict(r.counts)
        feed.last = last

    def watched(self) -> bool:
        return self.clients > 0 or time.monotonic() < self._wanted_until

    def publish(self, name: Optional[str], image: Any) -> None:
        """An annotated frame: encoded (at most ``max_fps`` per source) for the MJPEG clients."""
        feed = self._feed(name)
        now = time.monotonic()
        if now - feed.t_jpeg < 1.0 / self.max_fps:
            return
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return
        with feed.cond:
            feed.jpeg, feed.t_jpeg = buf.tobytes(), now
            feed.seq += 1
            feed.cond.notify_all()

    # -- what the pages show
    def _lane(self, feed: _Feed) -> Tuple[Any, Any, int]:
        """(FrameSource, FrameStats, results) of a feed."""
        if feed.lane is None:
            s = self.stream
            return s.source, s.stats, s.frames
        return feed.lane.source, feed.lane.stats, feed.lane.frames

    def status(self) -> Dict[str, Any]:
        out: List[Dict[str, Any]] = []
        now = time.monotonic()
        for name in self.order:
            feed = self.feeds[name]
            src, stats, frames = self._lane(feed)
            lat = stats.column("latency")
            age = None if src.last_frame_at is None else round(now - src.last_frame_at, 3)
            out.append({"name": name, "source": src.spec.uri, "kind": src.spec.kind, "state": src.state(),
                        "fps": round(feed.fps(), 2), "frames": frames, "frames_read": src.frames_read,
                        "dropped": src.dropped, "reconnects": src.reconnects, "latency_p50_ms": lat["p50"],
                        "latency_p90_ms": lat["p90"], "last_frame_age_s": age, "last": feed.last,
                        "size": list(src.shape[::-1]) if src.shape else None})
        model = self.stream.model.info
        return {"sources": out, "model": {k: model.get(k) for k in ("artifact", "model", "backend", "device")},
                "task": self.stream.model.manifest.task, "time": round(time.time(), 3)}

    def health(self) -> Tuple[int, Dict[str, Any]]:
        srcs = {}
        for entry in self.status()["sources"]:
            srcs[entry["name"]] = {"state": entry["state"], "delivering": entry["state"] == "delivering",
                                   "last_frame_age_s": entry["last_frame_age_s"], "frames_read": entry["frames_read"]}
        ok = all(s["delivering"] for s in srcs.values())
        return (200 if ok else 503), {"ok": ok, "sources": srcs}

    def next_jpeg(self, name: str, after: int, timeout: float) -> Tuple[Optional[bytes], int]:
        feed = self.feeds[name]
        with feed.cond:
            feed.cond.wait_for(lambda: feed.seq > after or self._closed.is_set(), timeout)
            return (feed.jpeg, feed.seq) if feed.seq > after else (None, after)

    def want(self, seconds: float = 5.0) -> None:
        self._wanted_until = max(self._wanted_until, time.monotonic() + seconds)

    def page(self) -> str:
        cards = "".join(
            f'<div class="card" id="c-{html.escape(n)}"><h2>{html.escape(n)}</h2>'
            f'<img src="stream/{html.escape(n)}.mjpg" alt="{html.escape(n)}">'
            f'<table class="stats"><tbody></tbody></table></div>' for n in self.order)
        return PAGE.replace("{{cards}}", cards).replace("{{title}}", html.escape(str(self.stream.model.folder.name)))


def _handler(server: StatusServer) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "edgetl"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = unquote(urlsplit(self.path).path)
            try:
                if path in ("/", "/index.html"):
                    server.want()
                    self._send(200, server.page().encode(), "text/html; charset=utf-8")
                elif path == "/status.json":
                    server.want()
                    self._json(200, server.status())
                elif path == "/health":
                    self._json(*server.health())
                elif path.startswith(("/stream", "/snapshot")):
                    self._media(path)
                else:
                    self._json(404, {"error": f"no page {path}", "pages": ["/", "/status.json", "/health",
                                                                          "/stream/NAME.mjpg", "/snapshot/NAME.jpg"]})
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _media(self, path: str) -> None:
            kind, _, rest = path.strip("/").partition("/")
            name = rest.rsplit(".", 1)[0] if rest else server.order[0]
            if name not in server.feeds:
                self._json(404, {"error": f"no source {name!r}", "sources": server.order})
            elif kind.startswith("snapshot"):
                server.want()
                jpeg, _ = server.next_jpeg(name, server.feeds[name].seq, 5.0)
                self._send(200, jpeg, "image/jpeg") if jpeg else self._json(503, {"error": "no frame yet"})
            else:
                self._mjpeg(name)

        def _mjpeg(self, name: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            with server._lock:
                server.clients += 1
            try:
                seq = 0
                while not server._closed.is_set():
                    jpeg, seq = server.next_jpeg(name, seq, 1.0)
                    if jpeg is None:
                        continue
                    self.wfile.write(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                    self.wfile.flush()
            except OSError:
                pass
            finally:
                with server._lock:
                    server.clients -= 1

    return Handler


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edgetl run: {{title}}</title>
<style>
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;background:#111;color:#eee;margin:16px}
h1{font-size:18px;margin:0 0 10px} #model{color:#aaa;font-size:13px;margin-bottom:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px} .card{background:#1d1d1d;border-radius:6px;padding:10px;width:360px}
.card h2{font-size:15px;margin:0 0 6px} .card img{width:100%;background:#000;border-radius:3px;min-height:120px}
.stats{width:100%;font-size:13px;border-collapse:collapse} .stats td{padding:2px 4px}
.stats td:first-child{color:#999;width:40%} .delivering{color:#5d5} .lost,.stalled{color:#f55}
.reconnecting,.starting{color:#fb3} .ended{color:#aaa}
</style></head>
<body><h1>edgetl run: {{title}}</h1><div id="model"></div><div class="grid">{{cards}}</div>
<script>
function row(k, v, cls){return '<tr><td>'+k+'</td><td'+(cls?' class="'+cls+'"':'')+'>'+v+'</td></tr>';}
function esc(t){return String(t).replace(/[&<>"]/g, function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];});}
async function tick(){
  try{
    const s = await (await fetch('status.json', {cache:'no-store'})).json();
    document.getElementById('model').textContent = s.model.model+' on '+s.model.backend+' '+(s.model.device||'');
    for(const e of s.sources){
      const card = document.getElementById('c-'+e.name); if(!card) continue;
      const last = e.last || {};
      const what = last.counts ? Object.entries(last.counts).map(function(kv){return kv[0]+' '+kv[1];}).join(', ')
                               : (last.label!==undefined ? last.label+' ('+last.score.toFixed(2)+')' : '-');
      card.querySelector('tbody').innerHTML =
        row('source', esc(e.source)) + row('state', e.state, e.state) +
        row('FPS', e.fps.toFixed(1)) + row('latency p50 / p90', e.latency_p50_ms.toFixed(1)+' / '+e.latency_p90_ms.toFixed(1)+' ms') +
        row(s.task==='detection' ? 'counts' : 'label', esc(what)) + row('frames / dropped', e.frames+' / '+e.dropped) +
        row('reconnects', e.reconnects) + row('size', e.size ? e.size.join('x') : '-');
    }
  }catch(err){}
}
tick(); setInterval(tick, 1000);
</script></body></html>
"""
