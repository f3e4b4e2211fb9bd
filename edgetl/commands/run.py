"""``edgetl run``: classify or detect on a camera, stream, video or image folder with an artifact (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _parse_options(pairs: tuple[str, ...]) -> dict:
    from ..runtime.errors import EdgetlError

    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EdgetlError(f"--option {pair!r} is not KEY=VALUE", hint="e.g. --option intra_op_threads=2")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--source", "-s", "sources", multiple=True, metavar="URI",
              help="0 (camera index), v4l2:///dev/video0, csi://0, rtsp://…, http(s)://…, a video file, "
                   "an image folder or glob, or gst:<pipeline … ! appsink>. Repeat it for several sources in "
                   "one process (NAME=URI names one; JSON lines then carry \"source\").")
@click.option("--sources", "sources_file", default=None, type=click.Path(path_type=Path), metavar="FILE",
              help="Sources from a file: one per line, URI or NAME=URI (# comments).")
@click.option("--serve", default=None, metavar="HOST:PORT",
              help="Serve the annotated stream(s) as MJPEG over HTTP, a status page and /health (JSON), e.g. "
                   "127.0.0.1:8080 (a port alone binds 127.0.0.1; 0.0.0.0:8080 opens it to the network).")
@click.option("--mqtt", default=None, metavar="mqtt://HOST[:PORT]",
              help="Also publish each JSON line (the --headless/--events output) to this MQTT broker (port 1883 "
                   "by default; needs edgetl[mqtt]). The broker must answer at start; when it is lost mid-run the "
                   "run goes on, reconnects, and the summary counts the messages dropped.")
@click.option("--topic", default=None, metavar="TOPIC", help="The MQTT topic to publish to (with --mqtt), e.g. plant/line1.")
@click.option("--mqtt-qos", default=0, show_default=True, type=click.IntRange(0, 1), metavar="0|1",
              help="MQTT QoS: 0 drops messages while the broker is away, 1 queues them (up to 1000) and resends.")
@click.option("--backend", default=None, help="Which build of the artifact to run (default: its first build).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override a backend option of the build (repeatable), e.g. intra_op_threads=2.")
@click.option("--headless", is_flag=True, help="No window: one JSON line per result on stdout.")
@click.option("--events", is_flag=True, help="Print a JSON line only when the label changes (detection: only "
                                            "frames where an object entered, left or crossed the count line).")
@click.option("--top-k", default=1, show_default=True, type=int, help="How many classes per result.")
@click.option("--roi", default=None, metavar="X,Y,W,H", help="Classify only this region of the frame (pixels).")
@click.option("--smooth", default=0.0, show_default=True, type=float, metavar="FRAMES",
              help="Temporal smoothing: EMA of the scores over about this many frames (0 = off).")
@click.option("--threshold", default=0.0, show_default=True, type=float,
              help="Classification: below this top-1 score the label is 'unknown'. Detection: the minimum box "
                   "score (0 = the score threshold the artifact was gated at; with --track or --count-line the "
                   "objects' threshold its training chose).")
@click.option("--track", is_flag=True,
              help="Detection: follow objects across frames (ids; --events prints entries and exits).")
@click.option("--count-line", default=None, metavar="X1,Y1,X2,Y2",
              help="Detection: count tracked objects crossing this segment (frame pixels), per class and "
                   "direction; implies --track.")
@click.option("--count-confidence", default=0.5, show_default=True, type=float, metavar="SCORE",
              help="Detection: count a crossing only when the track's boxes scored at least this on average "
                   "(a track kept alive by low-score boxes, e.g. background found on and off, is not an "
                   "object); 0 counts every track.")
@click.option("--realtime", is_flag=True,
              help="Play a file/image folder like a camera: paced at its FPS, latest-frame policy (drops "
                   "frames when inference is slower). Default for files: every frame, in order.")
@click.option("--fps", default=None, type=float, help="Pace for --realtime (default: the file's FPS; 30 for images).")
@click.option("--save", default=None, type=click.Path(path_type=Path), metavar="OUT.mp4",
              help="Write the annotated video (.mp4/.mov: mp4v, .avi/.mkv: MJPG). It is written as OUT.partial.mp4 "
                   "and renamed at the end; a partial file left by a killed run is removed at the next start.")
@click.option("--max-frames", default=None, type=click.IntRange(min=1), help="Stop after this many results.")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this many seconds.")
@click.option("--reconnect-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              metavar="SECONDS", help="How long to wait for a camera/stream that is lost, sends nothing, or is not "
                                      "up yet at start, reopening it, before giving up (exit 3).")
@click.option("--decode-threads", default=None, type=click.IntRange(min=0), metavar="N",
              help="FFmpeg decoding threads for files and streams (default: 1 when the model runs on the CPU, "
                   "leaving the other cores to inference; 0 = one per core).")
@click.option("--summary-json", default=None, type=click.Path(path_type=Path), metavar="FILE",
              help="Also write the end-of-run summary as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact's files at start.")
def run(artifact: Path, sources: tuple[str, ...], sources_file: Path | None, serve: str | None, mqtt: str | None,
        topic: str | None, mqtt_qos: int, backend: str | None, options: tuple[str, ...], headless: bool, events: bool,
        top_k: int, roi: str | None, smooth: float, threshold: float, track: bool, count_line: str | None,
        count_confidence: float, realtime: bool, fps: float | None,
        save: Path | None, max_frames: int | None, duration: float | None, reconnect_timeout: float,
        decode_threads: int | None, summary_json: Path | None, no_verify: bool) -> int:
    """Run an artifact on a camera, stream, video file or image folder (no torch needed).

    Shows a window with label, score, FPS and latency when a display exists; otherwise (or with
    --headless) prints one JSON line per result: {"t", "frame", "label", "score", "top_k",
    "latency_ms", "timings_ms": {wait, preprocess, infer, post}, "dropped"}, plus "file" for an
    image folder. A detection artifact prints {"detections": [{"label", "class", "score", "box":
    [x1, y1, x2, y2]} (+ "id" with --track)], "counts": {label: n}} instead of label/score/top_k,
    and "events"/"line_counts" with --track/--count-line. A summary (frames, FPS, latency p50/p90,
    drops, skipped images; detections and line counts) goes to stderr at exit (stdout in window mode). Images an --roi does not fit are skipped and listed there.
    --mqtt URL --topic T publishes the same JSON objects (one message per line) to an MQTT broker.

    Live sources keep only the newest frame (stale frames are dropped and counted) and are reopened
    with back-off when lost, when they send nothing, or when not up yet at start; files are
    processed frame by frame unless --realtime. Ctrl-C / SIGTERM stop cleanly and finalise --save.
    Credentials in a URI (user:password@) are shown as user:***@. --option names are checked
    against the backend's options. Exit codes: 0 done, 2 bad input, 3 source lost.

    Several sources (--source A --source B ..., or --sources FILE): one capture thread each, the
    frames that are ready inferred as one batch; each JSON line carries "source" (its name) and
    "batch"; one source lost or ended never stops the others, and the run ends when all are gone
    (exit 3 if one of them was lost). --max-frames counts per source.

    \b
    Examples:
      edgetl run artifacts/elpv --source 0                          # USB camera, window
      edgetl run artifacts/elpv --source csi://0 --headless --events
      edgetl run artifacts/elpv --source rtsp://10.0.0.5/stream --headless --smooth 5 --threshold 0.6
      edgetl run artifacts/elpv --source line.mp4 --headless --save annotated.mp4 --summary-json s.json
      edgetl run artifacts/elpv --source line.mp4 --realtime --headless --duration 30
      edgetl run artifacts/elpv --source 'shots/*.png' --headless --top-k 2 --backend openvino
      edgetl run artifacts/cells-det --source belt.mp4 --headless --count-line 640,0,640,720 --events
      edgetl run artifacts/elpv -s left=rtsp://10.0.0.5/a -s right=rtsp://10.0.0.6/a --headless --serve :8080
      edgetl run artifacts/elpv --source rtsp://10.0.0.5/a --headless --events --mqtt mqtt://10.0.0.2 --topic line1
    """
    from ..runtime.app import AppOptions, StreamOptions, run_app
    from ..runtime.errors import EdgetlError
    from ..runtime.model import load

    uris = list(sources)
    if sources_file is not None:
        from ..runtime.multi import read_sources_file
        uris += read_sources_file(sources_file)
    if not uris:
        raise EdgetlError("no --source given", hint="give --source URI (repeatable) or --sources FILE, "
                                                     "e.g. --source 0 or --source rtsp://10.0.0.5/stream")
    if serve is not None:
        from ..runtime.serve import parse_address
        parse_address(serve)  # a bad HOST:PORT is refused before the artifact loads
    if mqtt is not None or topic is not None:
        from ..runtime.errors import require
        from ..runtime.mqtt import check_options
        check_options(mqtt, topic, mqtt_qos)  # before the artifact loads, like --serve
        require("edgetl run --mqtt", "paho")

    stream_opts = StreamOptions(top_k=top_k, roi=roi, smooth=smooth, threshold=threshold,
                                realtime=True if realtime else None, fps=fps, reconnect_timeout=reconnect_timeout,
                                max_frames=max_frames, duration=duration, decode_threads=decode_threads,
                                track=track or bool(count_line), count_line=count_line,
                                count_confidence=count_confidence)
    app_opts = AppOptions(headless=headless, events=events, save=save, summary_json=summary_json, serve=serve,
                          mqtt=mqtt, mqtt_topic=topic, mqtt_qos=mqtt_qos)
    model = load(artifact, backend=backend, options=_parse_options(options), verify=not no_verify)
    try:
        run_app(model, uris, stream_opts, app_opts)
    finally:
        model.close()
    return 0
