"""A local MJPEG-over-HTTP camera for the stream tests and benchmarks (stdlib http.server, one
thread per client), run as a subprocess so a test can kill it like a real camera.

    python tests/mjpeg_server.py [--port 0] [--size 320x240] [--fps 30] [--mode live|silent]
                                 [--resize-after S --resize-to WxH] [--lifetime 600]

Prints ``PORT <n>`` once it listens on 127.0.0.1, then serves ``http://127.0.0.1:<n>/stream.mjpg``
(multipart/x-mixed-replace JPEG frames: blocks of 10 frames alternate dark / bright, with a moving
square) until SIGTERM or ``--lifetime`` seconds. ``--mode silent`` answers with the headers and then
sends nothing (a camera that is there but frozen); ``--resize-after S`` switches to ``--resize-to``
S seconds after the server started.
"""

import argparse
import http.server
import os
import signal
import threading
import time

import cv2
import numpy as np


def size(text):
    w, _, h = text.partition("x")
    return int(w), int(h)


def frame(i, wh):
    w, h = wh
    img = np.full((h, w, 3), 50 if (i // 10) % 2 == 0 else 205, np.uint8)
    x = (i * 3) % max(1, w - 10)
    cv2.rectangle(img, (x, h // 3), (x + 9, h // 3 + 9), (0, 0, 255), -1)
    cv2.putText(img, str(i), (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0), 1)
    return img


def handler_for(a, t_start):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.flush()
            if a.mode == "silent":
                time.sleep(a.lifetime)
                return
            i, t0 = 0, time.monotonic()
            while True:
                wh = a.resize_to if a.resize_after and time.monotonic() - t_start >= a.resize_after else a.size
                data = cv2.imencode(".jpg", frame(i, wh))[1].tobytes()
                try:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                     + data + b"\r\n")
                    self.wfile.flush()
                except OSError:
                    return
                i += 1
                delay = t0 + i / a.fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--size", type=size, default=(320, 240))
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--mode", choices=("live", "silent"), default="live")
    ap.add_argument("--resize-after", type=float, default=0.0)
    ap.add_argument("--resize-to", type=size, default=(160, 120))
    ap.add_argument("--lifetime", type=float, default=600.0)
    a = ap.parse_args()
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    http.server.ThreadingHTTPServer.daemon_threads = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), handler_for(a, time.monotonic()))
    print("PORT %d" % server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # at once: client threads are mid-write
    timer = threading.Timer(a.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
