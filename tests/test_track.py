"""runtime/track.py: ids that follow objects through misses, crossings and low-score frames; entries
and exits; line crossings counted once per object and direction, per class."""

import numpy as np
import pytest

from edgetl.runtime.detect import Detections
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.track import LineCounter, Track, Tracker, greedy_match, parse_line, tracks_to_detections

SIZE = 40.0


def box_at(cx, cy, size=SIZE):
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def make_scene(n_frames=60, seed=0):
    """Three objects at constant speed with noise (px): A right along y=200, B left along y=210 (A and
    B cross at frame ~20), C down along x=500 at 12 px/frame. C is missed on frames 20-22; A's score
    drops to 0.3 on frames 30-35; B's class flickers on frames 5 and 6; a low-score false positive
    every frame and a one-frame high-score false positive at frame 10.
    Returns per frame (Detections, {object: row in the detections})."""
    rng = np.random.default_rng(seed)
    objects = {"A": ((40.0, 200.0), (8.0, 0.0), 0), "B": ((360.0, 210.0), (-8.0, 0.0), 1),
               "C": ((500.0, 20.0), (0.0, 12.0), 2)}
    frames = []
    for f in range(n_frames):
        boxes, scores, classes, rows = [], [], [], {}
        for name, ((x0, y0), (vx, vy), cls) in objects.items():
            if name == "C" and 20 <= f <= 22:
                continue
            rows[name] = len(boxes)
            boxes.append(np.array(box_at(x0 + vx * f, y0 + vy * f)) + rng.normal(0, 1.5, 4))
            scores.append(0.3 if name == "A" and 30 <= f <= 35 else rng.uniform(0.7, 0.95))
            classes.append(0 if name == "B" and f in (5, 6) else cls)
        boxes.append(rng.uniform(0, 600, 2).tolist() * 2 + np.array([0, 0, 30, 30]))  # low-score noise
        scores.append(0.2)
        classes.append(0)
        if f == 10:
            boxes.append(np.array(box_at(300, 400)))
            scores.append(0.9)
            classes.append(1)
        frames.append((Detections(np.array(boxes, np.float32), scores, classes), rows))
    return frames


def run_scene(tracker, frames):
    """Per frame: {object: track id} for the objects a returned track follows (its box is the object's
    detection this frame), and the list of returned tracks."""
    out = []
    for f, (dets, rows) in enumerate(frames):
        tracks = tracker.update(dets, f)
        ids = {}
        for name, r in rows.items():
            hit = [t.id for t in tracks if np.allclose(t.box, dets.boxes[r])]
            assert len(hit) <= 1
            if hit:
                ids[name] = hit[0]
        out.append((ids, tracks))
    return out


def test_each_object_keeps_one_id_through_misses_crossings_and_low_scores():
    frames = make_scene()
    tracker = Tracker(high=0.5, low=0.1, match_iou=0.3, max_age=30, min_hits=2)
    result = run_scene(tracker, frames)
    ids = {name: {r[0][name] for r in result if name in r[0]} for name in "ABC"}
    assert all(len(v) == 1 for v in ids.values()), ids  # one id per object, A and B not swapped
    assert len({next(iter(v)) for v in ids.values()}) == 3
    for f in range(1, 60):  # confirmed from frame 1 (min_hits=2) on, every frame each object is seen
        visible = set(frames[f][1])
        assert set(result[f][0]) == visible, (f, result[f][0], visible)
    assert "C" not in result[21][0] and "C" in result[23][0]  # missed 3 frames, same id after
    assert all("A" in result[f][0] for f in range(30, 36))  # low-score boxes kept by the second stage
    # the false positives never became tracks: ids 1..3 only
    assert tracker.next_id == 4
    assert all(len(r[1]) == len(frames[f][1]) for f, r in enumerate(result) if f >= 1)


def test_the_tracks_class_is_the_majority_vote():
    result = run_scene(Tracker(), make_scene())
    b_tracks = [t for ids, tracks in result for t in tracks if ids.get("B") == t.id]
    assert all(t.cls == 1 for t in b_tracks[3:])  # B's class flickered to 0 on frames 5 and 6 only
    a_track = [t for ids, tracks in result[40:] for t in tracks if ids.get("A") == t.id][0]
    assert a_track.cls == 0 and a_track.hits == 41 and a_track.age == 41 and a_track.missed == 0


def test_without_the_second_stage_low_scores_would_be_lost():
    """The scene's low-score frames are a real test: with ``low == high`` A is not followed then."""
    result = run_scene(Tracker(high=0.5, low=0.5), make_scene())
    assert not any("A" in result[f][0] for f in range(30, 36))


def test_low_score_detections_never_start_tracks():
    tracker = Tracker(high=0.5, low=0.1, min_hits=1)
    for f in range(10):
        assert tracker.update(Detections(np.array([box_at(100 + f, 100)], np.float32), [0.3], [0])) == []
    assert tracker.next_id == 1 and tracker.events() == []


def test_enter_and_exit_events():
    frames = make_scene()
    tracker = Tracker(max_age=5, min_hits=2, labels=["a", "b", "c"])
    events = []
    for f, (dets, _) in enumerate(frames[:40]):
        tracker.update(dets, f)
        events += tracker.events()
    enters = [e for e in events if e["event"] == "enter"]
    assert [(e["frame"], e["label"]) for e in enters] == [(1, "a"), (1, "b"), (1, "c")]
    assert not [e for e in events if e["event"] == "exit"]  # C's 3-frame miss is within max_age
    for f in range(40, 46):  # nothing more is seen: everyone leaves after max_age = 5 frames unseen
        tracker.update(Detections.empty(), f)
        events += tracker.events()
    exits = [e for e in events if e["event"] == "exit"]
    assert sorted(e["id"] for e in exits) == [1, 2, 3]
    assert all(e["frame"] == 45 and e["last_seen"] == 39 for e in exits)
    assert tracker.update(Detections.empty(), 46) == [] and tracker.events() == []


def test_finish_reports_the_tracks_still_alive():
    tracker = Tracker(min_hits=1)
    tracker.update(Detections(np.array([box_at(50, 50), box_at(200, 50)], np.float32), [0.9, 0.9], [0, 1]))
    exits = tracker.finish()
    assert [e["event"] for e in exits] == ["exit", "exit"] and [e["label"] for e in exits] == ["class 0", "class 1"]


def test_a_tentative_track_must_be_matched_on_consecutive_frames():
    tracker = Tracker(min_hits=3)
    d = Detections(np.array([box_at(50, 50)], np.float32), [0.9], [0])
    assert tracker.update(d) == [] and tracker.update(d) == []
    assert [t.id for t in tracker.update(d)] == [1]
    tracker2 = Tracker(min_hits=2)
    tracker2.update(d)
    tracker2.update(Detections.empty())  # missed while tentative: dropped
    assert tracker2.update(d) == [] and tracker2.next_id == 1


def test_tracker_refuses_bad_settings():
    with pytest.raises(EdgetlError):
        Tracker(high=0.3, low=0.5)
    with pytest.raises(EdgetlError):
        Tracker(min_hits=0)


def test_greedy_match_takes_the_best_pairs_first():
    iou = np.array([[0.9, 0.8], [0.85, 0.1]])
    pairs, rows, cols = greedy_match(iou, 0.3)
    assert pairs == [(0, 0)] and rows == [1] and cols == [1]  # 0.1 is under the threshold
    pairs, _, _ = greedy_match(np.array([[0.6, 0.7], [0.65, 0.2]]), 0.3)
    assert sorted(pairs) == [(0, 1), (1, 0)]


def test_tracks_to_detections():
    t = [Track(4, np.array(box_at(10, 10), np.float32), 1, 0.8, 3, 3), Track(6, np.array(box_at(90, 10)), 0, 0.6, 2, 5)]
    dets, ids = tracks_to_detections(t)
    assert ids == [4, 6] and dets.classes.tolist() == [1, 0] and dets.boxes.shape == (2, 4)
    assert len(tracks_to_detections([])[0]) == 0


# ---- line counting -------------------------------------------------------------------------------

def track(i, cx, cy, cls=0, size=SIZE):
    return Track(i, np.array(box_at(cx, cy, size), np.float32), cls, 0.9, 1, 1)


def run_counter(counter, paths):
    """paths: {id: (cls, [(cx, cy) or None per frame])} -> the events."""
    events = []
    n = max(len(p) for _, p in paths.values())
    for f in range(n):
        tracks = [track(i, *p[f], cls) for i, (cls, p) in paths.items() if f < len(p) and p[f] is not None]
        events += counter.update(tracks, f)
    return events


def test_each_crossing_counted_once_with_its_direction_and_class():
    counter = LineCounter((100, 240, 540, 240), ["cell", "crack"])
    down = [(200, y) for y in range(150, 340, 10)]  # crosses downwards: "in"
    up = [(300, y) for y in range(340, 150, -10)]  # crosses upwards: "out"
    beside = [(600, y) for y in range(150, 340, 10)]  # crosses the line's extension, not the segment
    gap = [(400, y) if not 230 <= y <= 260 else None for y in range(150, 340, 10)]  # unseen while crossing
    events = run_counter(counter, {1: (0, down), 2: (1, up), 3: (0, beside), 4: (1, gap)})
    assert sorted((e["id"], e["direction"], e["label"]) for e in events) == [
        (1, "in", "cell"), (2, "out", "crack"), (4, "in", "crack")]
    assert all(e["event"] == "cross" for e in events)
    assert counter.counts == {"in": {"cell": 1, "crack": 1}, "out": {"cell": 0, "crack": 1}, "total": 3}
    first = {e["id"]: e["frame"] for e in events}
    assert first[1] == 10 and first[2] == 11  # the frame the centre got past the line's band (8 px)


def test_jitter_on_the_line_is_not_counted_again():
    counter = LineCounter((0, 240, 640, 240), ["cell"])
    rng = np.random.default_rng(3)
    path = [(320, y) for y in range(150, 240, 10)]
    path += [(320, 240 + rng.uniform(-6, 6)) for _ in range(40)]  # stops on the line, the box jitters
    path += [(320, y) for y in range(250, 340, 10)]
    events = run_counter(counter, {7: (0, path)})
    assert [(e["id"], e["direction"]) for e in events] == [(7, "in")]
    assert counter.counts["total"] == 1


def test_a_track_counts_at_most_once_per_direction():
    counter = LineCounter((0, 240, 640, 240), ["cell"])
    there = [(320, y) for y in range(150, 340, 10)]
    back = list(reversed(there))
    events = run_counter(counter, {9: (0, there + back + there + back)})
    assert [e["direction"] for e in events] == ["in", "out"]
    assert counter.counts == {"in": {"cell": 1}, "out": {"cell": 1}, "total": 2}


def test_a_track_first_seen_past_the_line_is_not_counted():
    counter = LineCounter((0, 240, 640, 240), ["cell"])
    assert run_counter(counter, {1: (0, [(320, y) for y in range(300, 400, 10)])}) == []


def test_tracker_and_counter_together():
    """The tracked scene with a vertical line at x=200: A (rightwards) and B (leftwards) cross it once
    each, in opposite directions; C never reaches it."""
    frames = make_scene()
    tracker = Tracker()
    counter = LineCounter((200, 0, 200, 479), ["a", "b", "c"])
    events = []
    for f, (dets, _) in enumerate(frames):
        events += counter.update(tracker.update(dets, f), f)
    # the line points down: moving right is the negative side (cross product < 0) -> "out"
    assert sorted((e["label"], e["direction"]) for e in events) == [("a", "out"), ("b", "in")]
    assert counter.counts["total"] == 2


def test_parse_line():
    assert parse_line("0,360,1280,360") == (0, 360, 1280, 360)
    assert parse_line([1, 2, 3, 4]) == (1, 2, 3, 4)
    for bad in ("0,360,1280", "a,b,c,d", "10,10,10,10", "-1,0,5,5", ""):
        with pytest.raises(EdgetlError) as err:
            parse_line(bad)
        assert "--count-line" in err.value.message and "--count-line 0,360,1280,360" in err.value.hint


# ---- counting only tracks that are objects on the balance of their boxes ----------------------------

def belt_frames(n=40):
    """A cell moving right at 12 px/frame scored 0.9 every frame, and below it a large "phantom" (bare
    belt the detector finds on and off, as on the conveyor video, labelled class 1 here to tell them
    apart): scored 0.6 on frames 0-2 and on every 10th frame, 0.2 on the others (the tracker's second
    stage keeps it alive on them), missing on frames 5, 15, 25, 35; both cross the line x = 240."""
    frames = []
    for f in range(n):
        boxes, scores, classes = [box_at(40 + 12 * f, 100)], [0.9], [0]
        if f % 10 != 5:
            boxes.append(box_at(30 + 12 * f, 300, size=120))
            scores.append(0.6 if f < 3 or f % 10 == 0 else 0.2)
            classes.append(1)
        frames.append(Detections(np.array(boxes, np.float32), scores, classes))
    return frames


def test_track_confidence_is_the_mean_score_of_its_matched_boxes():
    tracker = Tracker(high=0.5, low=0.1)
    for f, s in enumerate([0.9, 0.8, 0.3, 0.2]):  # the last two reach it through the second stage
        tracks = tracker.update(Detections(np.array([box_at(100 + 5 * f, 100)], np.float32), [s], [0]), f)
    assert len(tracks) == 1 and tracks[0].hits == 4
    assert tracks[0].confidence == pytest.approx((0.9 + 0.8 + 0.3 + 0.2) / 4) and tracks[0].score == pytest.approx(0.2)
    assert track(1, 0, 0).confidence == pytest.approx(0.9)  # a track made by hand: its score


def test_a_track_living_on_low_score_boxes_is_not_counted():
    def count(min_confidence):
        tracker = Tracker(high=0.5, low=0.1)
        counter = LineCounter((240, 0, 240, 479), ["cell", "phantom"], min_confidence=min_confidence)
        events = []
        for f, dets in enumerate(belt_frames()):
            events += counter.update(tracker.update(dets, f), f)
        return events, counter

    events, counter = count(0.5)
    assert [(e["label"], e["direction"]) for e in events] == [("cell", "out")]
    assert counter.counts["total"] == 1 and counter.low_confidence == 1
    events, counter = count(0.0)  # every track counted: the phantom's crossing too (mean score 0.38)
    assert sorted(e["label"] for e in events) == ["cell", "phantom"] and counter.low_confidence == 0


def test_counter_refuses_a_bad_confidence():
    for bad in (-0.1, 1.5):
        with pytest.raises(EdgetlError) as err:
            LineCounter((0, 1, 2, 3), ["cell"], min_confidence=bad)
        assert "--count-confidence" in err.value.message
