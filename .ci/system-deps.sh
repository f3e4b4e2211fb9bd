#!/usr/bin/env bash
# System packages the stream tests (tests/test_streams*.py) use, from Debian 12's archive:
#   - GStreamer's RTSP server (gir1.2-gst-rtsp-server-1.0 + python3-gi, run by the system python3):
#     the RTSP camera the tests start on 127.0.0.1 (FFmpeg 5.1's listen mode cannot serve RTSP);
#   - GStreamer's plugins (videotestsrc, x264enc, rtph264pay, jpegenc, avdec_h264, appsink);
#   - python3-opencv (built with GStreamer): `make gst-env` builds .venv-gst on it, so gst:, csi:// and
#     GStreamer-RTSP sources run through a real OpenCV+GStreamer (the pip wheel has no GStreamer);
#   - mosquitto (the MQTT broker of the --mqtt tests) and chromium (the headless-browser screenshot
#     of --serve's page).
# Run as root (CI: .ci/run does it when it is root); tests that need what is missing skip with the reason.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: run as root (sudo make system-deps)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    python3 python3-venv python3-gi python3-numpy python3-opencv \
    gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0 \
    gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
    gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp \
    mosquitto chromium fonts-dejavu-core
