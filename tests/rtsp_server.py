"""A local RTSP camera for the stream tests and benchmarks: GStreamer's RTSP server (gst-rtsp-server,
Debian's gir1.2-gst-rtsp-server-1.0) on 127.0.0.1, run by the system python3 (python3-gi).

    /usr/bin/python3 tests/rtsp_server.py [--port 0] [--size 320x240] [--fps 30] [--codec h264|jpeg]
                                          [--resize-after S --resize-to WxH] [--mode live|silent] [--stamp]

Prints ``PORT <n>`` on stdout once it listens (``--port 0``: an ephemeral port), then serves
``rtsp://127.0.0.1:<n>/live`` (one shared ``videotestsrc is-live=true`` encoded as H.264 with
x264enc zerolatency, or as RTP/JPEG) until SIGTERM/SIGINT or ``--lifetime`` seconds.
``--resize-after S --resize-to WxH`` changes the stream's resolution S seconds after the first
client came (the capsfilter of the shared pipeline). ``--mode silent`` answers the RTSP handshake
(OPTIONS, DESCRIBE, SETUP, PLAY) and then sends no frame: a camera that is there but frozen.
FFmpeg 5.1's ``-rtsp_flags listen`` could not serve RTSP to a client, hence this server.

``--stamp`` (for benchmarks/rtsp_latency.py): the frames come from an ``appsrc`` fed here (a scrolling
texture and a moving square) and each carries, in its top-left 256x64 pixels, its capture time
(``time.time()`` in ms, modulo 2**32, read just before the frame is pushed) and its number as 64
black/white 16x16 blocks (:func:`draw_stamp`), aligned on H.264's macroblocks so they survive the
encoder; :func:`read_stamp` reads them back from a decoded BGR or gray frame. These two functions
need numpy only (gi is imported by :func:`main`), so the benchmark and tests/test_rtsp_stamp.py
import them from here.
"""

import argparse
import signal
import sys
import threading
import time

import numpy as np

STAMP_BLOCK = 16  # pixels: one H.264 macroblock
STAMP_COLS, STAMP_ROWS = 16, 4  # 64 blocks: 256x64 pixels at the top left
STAMP_LOW, STAMP_HIGH = 16, 235  # the luma of a 0 and a 1 (video range: black and white)


def _crc8(data):
    """CRC-8 (polynomial 0x07) of ``data``: a frame without a stamp (or a damaged one) reads as None."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _stamp_bits(ms, counter):
    payload = (int(ms) & 0xFFFFFFFF).to_bytes(4, "big") + (int(counter) & 0xFFFFFF).to_bytes(3, "big")
    word = int.from_bytes(payload + bytes([_crc8(payload)]), "big")
    return np.array([(word >> (63 - i)) & 1 for i in range(64)], np.uint8)


def draw_stamp(luma, ms, counter):
    """Write (``ms`` mod 2**32, ``counter`` mod 2**24, CRC-8) as 64 blocks into the top-left
    256x64 pixels of the 2-D uint8 ``luma`` (an I420 Y plane, or a gray image), row by row, most
    significant bit first: ``STAMP_HIGH`` for a 1, ``STAMP_LOW`` for a 0."""
    b = STAMP_BLOCK
    bits = _stamp_bits(ms, counter).reshape(STAMP_ROWS, STAMP_COLS)
    levels = np.where(bits, STAMP_HIGH, STAMP_LOW).astype(np.uint8)
    luma[:STAMP_ROWS * b, :STAMP_COLS * b] = np.kron(levels, np.ones((b, b), np.uint8))
    return luma


def read_stamp(image):
    """``(ms mod 2**32, counter)`` from a decoded frame (BGR or gray, at the size it was sent),
    or None when the blocks do not carry a valid stamp (CRC mismatch, frame too small). Each bit is
    the mean of its block's central 8x8 pixels against the middle grey: blur, ringing and chroma
    noise at the block edges do not reach it."""
    b, rows, cols = STAMP_BLOCK, STAMP_ROWS, STAMP_COLS
    if image.shape[0] < rows * b or image.shape[1] < cols * b:
        return None
    region = np.asarray(image[:rows * b, :cols * b], np.float32)
    if region.ndim == 3:
        region = region.mean(axis=2)
    cells = region.reshape(rows, b, cols, b)[:, b // 4:3 * b // 4, :, b // 4:3 * b // 4].mean(axis=(1, 3))
    bits = (cells.reshape(-1) > (STAMP_LOW + STAMP_HIGH) / 2).astype(np.uint8)
    word = int("".join(map(str, bits)), 2).to_bytes(8, "big")
    if _crc8(word[:7]) != word[7]:
        return None
    return int.from_bytes(word[:4], "big"), int.from_bytes(word[4:7], "big")


def stamp_age_ms(ms, now=None):
    """How old a stamp's ``ms`` (wall clock in ms mod 2**32) is at ``now`` (``time.time()``), in ms."""
    age = ((time.time() if now is None else now) * 1000.0 - ms) % 2.0 ** 32
    return age - 2.0 ** 32 if age > 2.0 ** 31 else age  # a stamp "from the future": the clock stepped back


class StampedFrames:
    """The ``--stamp`` picture: a smooth texture scrolling 4 pixels a frame with a bright square
    crossing it (motion for the encoder and the decoder, like a conveyor camera), then the stamp."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        y, x = np.mgrid[0:h, 0:2 * w].astype(np.float32)
        rng = np.random.default_rng(0)
        tex = (110 + 40 * np.sin(x / 37.0) * np.cos(y / 23.0) + 25 * np.sin((x + 2 * y) / 11.0)
               + rng.normal(0, 6, (h, 2 * w)))
        self.texture = np.clip(tex, 0, 255).astype(np.uint8)
        self.chroma = np.full(w * h // 2, 128, np.uint8).tobytes()  # U and V: grey

    def picture(self, n):
        """Frame ``n``'s luma (h x w), without the stamp."""
        w, h = self.w, self.h
        x = (4 * n) % w
        luma = np.ascontiguousarray(self.texture[:, x:x + w])
        s = max(16, h // 6)
        cx = (8 * n) % (w + s) - s
        cy = h // 2 - s // 2
        luma[cy:cy + s, max(cx, 0):max(cx + s, 0)] = 220
        return luma


def feed_stamped(appsrc, Gst, w, h, fps, stop):
    """Push stamped frames into ``appsrc`` at ``fps`` until ``stop`` is set (the media was
    unprepared). The stamp is the wall clock read just before the push (the "capture"): a push that
    is late (a loaded host) is late in its stamp too. Until the pipeline takes buffers (it is built
    in NULL, and the RTSP media prerolls it live) a push answers FLUSHING: the frame is not sent,
    like a camera frame nobody reads."""
    frames = StampedFrames(w, h)
    period = 1.0 / fps
    t_next = time.perf_counter()
    n = 0
    while not stop.is_set():
        delay = t_next - time.perf_counter()
        if delay > 0 and stop.wait(delay):
            break
        luma = frames.picture(n)  # the picture first, the stamp at the last moment
        draw_stamp(luma, int(time.time() * 1000) & 0xFFFFFFFF, n)
        appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(luma.tobytes() + frames.chroma))
        n += 1
        t_next += period
        if time.perf_counter() - t_next > 1.0:  # more than a second behind (a stalled host): resync
            t_next = time.perf_counter()


def size(text):
    w, _, h = text.partition("x")
    return int(w), int(h)


def main():
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--size", type=size, default=(320, 240))
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--codec", choices=("h264", "jpeg"), default="h264")
    ap.add_argument("--mode", choices=("live", "silent"), default="live")
    ap.add_argument("--resize-after", type=float, default=0.0)
    ap.add_argument("--resize-to", type=size, default=(160, 120))
    ap.add_argument("--lifetime", type=float, default=600.0)
    ap.add_argument("--stamp", action="store_true", help="frames from an appsrc, each stamped with its capture "
                    "time and number (draw_stamp); needs --size of at least 256x64")
    a = ap.parse_args()
    if a.stamp and (a.resize_after > 0 or a.size[0] < STAMP_COLS * STAMP_BLOCK or a.size[1] < STAMP_ROWS * STAMP_BLOCK):
        ap.error("--stamp needs --size of at least 256x64 and no --resize-after")
    Gst.init(None)
    w, h = a.size
    enc = ("x264enc tune=zerolatency speed-preset=ultrafast key-int-max=%d bitrate=2000 ! "
           "rtph264pay name=pay0 pt=96 config-interval=1" % a.fps if a.codec == "h264" else
           "jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26")
    # silent: a valve that drops every buffer after the first one (it prerolls, so DESCRIBE gets its SDP)
    gate = "identity name=gate ! " if a.mode == "silent" else ""
    raw = f"video/x-raw,format=I420,width={w},height={h},framerate={a.fps}/1"
    # --stamp: fed by feed_stamped; at most 2 frames queued, the oldest dropped (a camera does not wait)
    src = (f"appsrc name=stampsrc is-live=true format=time do-timestamp=true max-buffers=2 leaky-type=downstream "
           f"caps={raw}" if a.stamp else "videotestsrc is-live=true pattern=ball ! videoscale ! videoconvert")
    launch = f"( {src} ! capsfilter name=caps caps={raw} ! {gate}{enc} )"
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(a.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(True)
    factory.set_latency(0)
    loop = GLib.MainLoop()

    def configured(_factory, media):
        pipeline = media.get_element()
        if a.stamp:
            stop = threading.Event()
            media.connect("unprepared", lambda _media: stop.set())
            threading.Thread(target=feed_stamped, args=(pipeline.get_by_name("stampsrc"), Gst, w, h, a.fps, stop),
                             daemon=True).start()
        if a.mode == "silent":
            gate_el = pipeline.get_by_name("gate")
            seen = [0]

            def drop(_pad, _info):
                seen[0] += 1
                return Gst.PadProbeReturn.OK if seen[0] <= 1 else Gst.PadProbeReturn.DROP

            gate_el.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, drop)
        if a.resize_after > 0:
            caps_el = pipeline.get_by_name("caps")
            rw, rh = a.resize_to

            def resize():
                caps_el.set_property("caps", Gst.Caps.from_string(
                    "video/x-raw,format=I420,width=%d,height=%d,framerate=%d/1" % (rw, rh, a.fps)))
                print("RESIZED %dx%d" % (rw, rh), flush=True)
                return False

            GLib.timeout_add(int(a.resize_after * 1000), resize)

    factory.connect("media-configure", configured)
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print("ERROR cannot listen on 127.0.0.1:%d" % a.port, flush=True)
        sys.exit(2)
    print("PORT %d" % server.get_bound_port(), flush=True)
    for s in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, s, loop.quit)
    GLib.timeout_add(int(a.lifetime * 1000), loop.quit)
    loop.run()


if __name__ == "__main__":
    main()
