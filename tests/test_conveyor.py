import csv
from pathlib import Path

import cv2
import pytest

from edgetl.conveyor import make_conveyor_video
from edgetl.runtime.errors import EdgetlError


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_conveyor_video_frames_and_labels(image_folder, tmp_path, suffix):
    items = [(p, p.parent.name) for p in sorted(image_folder.rglob("*.png"))[:5]]
    out = tmp_path / f"conveyor{suffix}"
    info = make_conveyor_video(items, out, fps=10, frames_per_item=4, size=(160, 96))
    assert info["frames"] == 20
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == 20 and frames[0].shape == (96, 160, 3)
    # the last frame of each item shows the item centred: the middle is not the plain belt colour
    assert abs(float(frames[3][48, 80].mean()) - 38) > 10
    rows = list(csv.DictReader(open(str(out) + ".labels.csv")))
    assert [r["label"] for r in rows[::4]] == [lab for _, lab in items]
    assert not list(tmp_path.glob(".*partial*"))


def test_conveyor_refuses_bad_input(tmp_path):
    with pytest.raises(EdgetlError, match="no images"):
        make_conveyor_video([], tmp_path / "x.mp4")
    with pytest.raises(EdgetlError, match="unsupported video type"):
        make_conveyor_video([(tmp_path / "a.png", "a")], tmp_path / "x.gif")


def test_conveyor_command_uses_the_held_out_split(tmp_path_factory, tmp_path):
    import json

    from _tinyrun import session_tiny_run
    from edgetl.cli import main

    run = session_tiny_run(tmp_path_factory)
    out = tmp_path / "c.avi"
    assert main(["data", "conveyor", str(run), str(out), "--items", "5", "--frames-per-item", "2",
                 "--size", "96x64"]) == 0
    rows = list(csv.DictReader(open(str(out) + ".labels.csv")))
    assert len(rows) == 10
    split = json.loads((run / "split.json").read_text())
    test_names = {Path(i["path"]).name for i in split["splits"]["test"]}
    assert {Path(r["path"]).name for r in rows} <= test_names
    assert main(["data", "conveyor", str(run), str(tmp_path / "d.avi"), "--size", "big"]) == 2
