"""edgetl.detect.counting: crossing events of `edgetl run --count-line` scored against ground truth."""

import json

from edgetl.detect.counting import score_counts


def _gt(tmp_path):
    # three objects moving right along three lanes, crossing x=50 at frames 5, 6 and 7
    per_frame = []
    for f in range(12):
        row = []
        for oid, (y, speed) in enumerate(((10, 10), (40, 9), (70, 8)), start=1):
            x = 50 - 5 * speed + f * speed
            row.append({"id": oid, "box": [x - 5, y - 5, x + 5, y + 5], "label": "a" if oid < 3 else "b",
                        "visible": 1.0, "ignore": False})
        per_frame.append(row)
    gt = {"fps": 10, "frames": 12, "line": [50, 0, 50, 100], "per_frame": per_frame,
          "objects": [{"id": 1, "label": "a"}, {"id": 2, "label": "a"}, {"id": 3, "label": "b"}],
          "crossings": [{"id": 1, "frame": 5}, {"id": 2, "frame": 5}, {"id": 3, "frame": 6}],
          "expected_counts": {"a": 2, "b": 1}}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path, per_frame


def _jsonl(tmp_path, per_frame, events):
    """events: (frame, track id, label, gt object whose box the track has)."""
    lines = []
    for f in range(12):
        evs = [e for e in events if e[0] == f]
        dets = [{"id": tid, "label": lab, "box": per_frame[f][oid - 1]["box"]} for _, tid, lab, oid in evs]
        lines.append(json.dumps({"frame": f, "detections": dets,
                                 "events": [{"event": "cross", "id": tid, "label": lab, "frame": f}
                                            for _, tid, lab, _ in evs]}))
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_object_counted_once(tmp_path):
    gt, pf = _gt(tmp_path)
    r = score_counts(_jsonl(tmp_path, pf, [(5, 11, "a", 1), (5, 12, "a", 2), (6, 13, "b", 3)]), gt)
    assert (r["counted"], r["missed"], r["extra"], r["class_correct"]) == (3, 0, 0, 3)
    assert r["counted_fraction"] == 1.0 and r["per_class"]["a"] == {"objects": 2, "counted": 2, "class_correct": 2}


def test_double_count_missed_and_wrong_class_are_told_apart(tmp_path):
    gt, pf = _gt(tmp_path)
    # object 1 counted twice (its track broke: ids 11 and 21), object 2 never, object 3 with the wrong label
    r = score_counts(_jsonl(tmp_path, pf, [(5, 11, "a", 1), (7, 21, "a", 1), (6, 13, "a", 3)]), gt)
    assert (r["counted"], r["missed"], r["extra"], r["class_correct"]) == (2, 1, 1, 1)
    assert r["per_class"]["a"]["counted"] == 1 and r["per_class"]["b"]["class_correct"] == 0


def test_an_event_far_from_any_crossing_is_extra(tmp_path):
    gt, pf = _gt(tmp_path)
    r = score_counts(_jsonl(tmp_path, pf, [(11, 11, "a", 1)]), gt, window=2)
    assert (r["counted"], r["extra"], r["missed"]) == (0, 1, 3)
