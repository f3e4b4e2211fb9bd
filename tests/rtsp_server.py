"""A local RTSP camera for the stream tests and benchmarks: GStreamer's RTSP server (gst-rtsp-server,
Debian's gir1.2-gst-rtsp-server-1.0) on 127.0.0.1, run by the system python3 (python3-gi).

    /usr/bin/python3 tests/rtsp_server.py [--port 0] [--size 320x240] [--fps 30] [--codec h264|jpeg]
                                          [--resize-after S --resize-to WxH] [--mode live|silent]

Prints ``PORT <n>`` on stdout once it listens (``--port 0``: an ephemeral port), then serves
``rtsp://127.0.0.1:<n>/live`` (one shared ``videotestsrc is-live=true`` encoded as H.264 with
x264enc zerolatency, or as RTP/JPEG) until SIGTERM/SIGINT or ``--lifetime`` seconds.
``--resize-after S --resize-to WxH`` changes the stream's resolution S seconds after the first
client came (the capsfilter of the shared pipeline). ``--mode silent`` answers the RTSP handshake
(OPTIONS, DESCRIBE, SETUP, PLAY) and then sends no frame: a camera that is there but frozen.
FFmpeg 5.1's ``-rtsp_flags listen`` could not serve RTSP to a client, hence this server.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def size(text):
    w, _, h = text.partition("x")
    return int(w), int(h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--size", type=size, default=(320, 240))
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--codec", choices=("h264", "jpeg"), default="h264")
    ap.add_argument("--mode", choices=("live", "silent"), default="live")
    ap.add_argument("--resize-after", type=float, default=0.0)
    ap.add_argument("--resize-to", type=size, default=(160, 120))
    ap.add_argument("--lifetime", type=float, default=600.0)
    a = ap.parse_args()
    Gst.init(None)
    w, h = a.size
    enc = ("x264enc tune=zerolatency speed-preset=ultrafast key-int-max=%d bitrate=2000 ! "
           "rtph264pay name=pay0 pt=96 config-interval=1" % a.fps if a.codec == "h264" else
           "jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26")
    # silent: a valve that drops every buffer after the first one (it prerolls, so DESCRIBE gets its SDP)
    gate = "identity name=gate ! " if a.mode == "silent" else ""
    launch = ("( videotestsrc is-live=true pattern=ball ! videoscale ! videoconvert ! "
              "capsfilter name=caps caps=video/x-raw,format=I420,width=%d,height=%d,framerate=%d/1 ! %s%s )"
              % (w, h, a.fps, gate, enc))
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
