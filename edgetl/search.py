"""``edgetl search``: the most accurate deployable model for a target under a latency, throughput or
size budget.

Candidates are backbone x input size x transfer mode (:data:`DEFAULT_CANDIDATES`, or a TOML list:
:func:`read_candidates`). Each one is trained by :func:`edgetl.train.run_training` into an ordinary
run folder, compiled for the target by :func:`edgetl.compile.compile_run` (the real ladder and the
gate) and timed on the target's backend with ``edgetl bench``'s frame-to-label measure
(:func:`edgetl.bench.run_bench`, batch 1 from a decoded uint8 frame to a label).

**Successive halving.** Rung ``r`` trains every candidate still in the race with the budget
``rungs[r]`` epochs (a cached feature-extract epoch is a pass of the linear head over stored
features, so those get :data:`FE_FACTOR` x as many); the best ``ceil(n / eta)`` by the validation
selection metric (macro-F1 unless the candidates say ``metric = "accuracy"``) go on to the next rung,
which trains them again from the start with the next budget (the warm-up + cosine schedule is set by
the epoch count, so a longer run is not the continuation of a shorter one). Those trained at the last
rung are the finalists: only they are compiled and timed. optuna's ``SuccessiveHalvingPruner`` would
do the bookkeeping, but it is not a dependency of edgetl and prunes *inside* one trial by reported
steps; the halving here is a sort and a slice (:func:`promote`). A candidate may set ``screen =
"feature-extract"``: its first rung is then the cheap cached feature-extract proxy of the same
backbone and size, and later rungs train it in its own mode.

**Latency** comes from one of: this machine, when the target's backend runs here (ONNX Runtime or
OpenVINO on a CPU of the profile's architecture); the user's ``--latency-table`` CSV
(``candidate,latency_ms``, e.g. ``edgetl bench`` on the device: the round trip is in docs/search.md),
which wins for the candidates it names; otherwise it is *unknown*: never estimated, and no candidate
is chosen by latency.

**The choice** is the finalist with the best validation selection metric among those that are
deployable (the artifact's decisive gate passed), have a known latency within ``--latency-ms`` /
``1000 / --fps`` and a deployed model within ``--max-mb``. Validation, not test: the test accuracy is
reported beside it, and choosing on it would make that figure optimistic.

**The output folder** is owned as :mod:`edgetl.cv` owns one: ``folder_lock(OUT)`` for the whole
search, ``search_plan.json`` (data fingerprint, target, candidates, rungs, per-rung configs) written
first; re-running the same command resumes (finished run folders and artifacts are kept, an
interrupted training resumes from its checkpoint, a latency already measured is kept); another plan
in the same OUT is refused by name (``--overwrite`` starts over). Layout::

    OUT/search_plan.json  OUT/search.json  OUT/pareto.png
    OUT/candidates/NAME/rung-1/ ... rung-K/   run folders (edgetl train)
    OUT/candidates/NAME/artifact/             the finalist's artifact (edgetl compile)
    OUT/candidates/NAME/compile.json, bench.json
    OUT/chosen/run -> ../candidates/NAME/rung-K, OUT/chosen/artifact -> ../candidates/NAME/artifact
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .runtime.errors import EdgetlError

PLAN_FILE = "search_plan.json"
SEARCH_FILE = "search.json"
PLOT_FILE = "pareto.png"
STATE_FILE = ".search_state.json"
CANDIDATES_DIR = "candidates"
CHOSEN_DIR = "chosen"
FEATURE_CACHE = "feature-cache"
FE_FACTOR = 10  # cached feature-extract: a head epoch over stored features costs ~nothing next to a backbone pass
DEFAULT_RUNGS = (2, 6)
DEFAULT_ETA = 3
MODE_ABBR = {"feature-extract": "fe", "fine-tune": "ft", "gradual-unfreeze": "gu"}
CANDIDATE_KEYS = ("name", "backbone", "input_size", "mode", "screen")
# set by the search itself, per rung: a candidate (or [defaults]) may not set them
RESERVED_KEYS = ("data", "out", "val", "test", "epochs", "cache_dir", "cache", "split_seed", "val_fraction",
                 "test_fraction")
# keys that do not change what a run learns: they may differ when a search resumes
_MAY_DIFFER = ("data", "out", "device", "num_workers", "amp", "cache_dir")

# (backbone, input size, mode): Lite0 at its native size both ways, smaller and larger members of the
# family at their native sizes, and MobileNetV3-Small (torchvision weights: skipped when not cached)
DEFAULT_CANDIDATES = (
    ("efficientnet_lite0", 224, "feature-extract"),
    ("efficientnet_lite0", 224, "fine-tune"),
    ("efficientnet_lite0", 192, "fine-tune"),
    ("efficientnet_lite1", 240, "fine-tune"),
    ("efficientnet_lite2", 260, "fine-tune"),
    ("mobilenet_v3_small", 224, "fine-tune"),
)


class NothingChosen(EdgetlError):
    """The search finished (search.json, the table and the plot are written) but no candidate is
    deployable within the budget: exit 1, as a failed gate."""

    exit_code = 1


# ------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    backbone: str
    input_size: int | None  # None: the backbone's own
    mode: str
    screen: str | None = None  # the mode of the first rung (a cheap proxy), e.g. feature-extract
    train: tuple[tuple[str, Any], ...] = ()  # other TrainConfig keys (lr, resize, aug_vflip, ...)
    name: str = ""

    def mode_at(self, rung: int) -> str:
        return self.screen if rung == 0 and self.screen else self.mode

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backbone": self.backbone, "input_size": self.input_size, "mode": self.mode,
                "screen": self.screen, **dict(self.train)}


def candidate_name(backbone: str, size: int | None, mode: str, screen: str | None = None) -> str:
    short = backbone.replace("efficientnet_", "").replace("mobilenet_", "mnet_")
    return f"{short}@{size or 'native'}-{MODE_ABBR.get(mode, mode)}" + (f"-screen{MODE_ABBR.get(screen, screen)}"
                                                                       if screen else "")


def default_candidates() -> list[Candidate]:
    return [Candidate(b, s, m, name=candidate_name(b, s, m)) for b, s, m in DEFAULT_CANDIDATES]


def _size_value(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        raise EdgetlError(f"{where}: input_size = {value!r} is not a size",
                          hint="give one whole number of pixels (a square input), at least 8, e.g. input_size = 224")
    return int(value)


def _train_keys(table: Mapping[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    from .train import _check_keys

    reserved = [k for k in table if k.replace("-", "_") in RESERVED_KEYS]
    if reserved:
        raise EdgetlError(f"{where}: {reserved[0]!r} is set by the search, not by a candidate",
                          hint="epochs come from --rungs; data, splits and seeds from the command line")
    return tuple(sorted(_check_keys(table, where).items()))


def _one_candidate(row: Any, i: int, path: Path, defaults: tuple[tuple[str, Any], ...]) -> Candidate:
    from .train import MODES

    where = f"{path} [[candidate]] #{i + 1}"
    if not isinstance(row, dict):
        raise EdgetlError(f"{where}: not a table", hint="write each candidate as a [[candidate]] table")
    if "backbone" not in row:
        raise EdgetlError(f"{where}: no backbone", hint='e.g. backbone = "efficientnet_lite0"')
    mode = row.get("mode", "fine-tune")
    for key in ("mode", "screen"):
        if key in row and row[key] not in MODES:
            raise EdgetlError(f"{where}: {key} = {row[key]!r} is not a mode", hint=f"use one of: {', '.join(MODES)}")
    size = _size_value(row.get("input_size"), where)
    extra = _train_keys({k: v for k, v in row.items() if k not in CANDIDATE_KEYS}, where)
    name = row.get("name") or candidate_name(row["backbone"], size, mode, row.get("screen"))
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace("@", "").replace(
            ".", "").isalnum():
        raise EdgetlError(f"{where}: name = {name!r} is not a plain name",
                          hint="letters, digits, '-', '_', '.', '@' (it names a folder)")
    from .backbones import get_backbone

    try:
        get_backbone(row["backbone"])
    except EdgetlError as exc:
        raise EdgetlError(f"{where}: {exc.message}", hint=exc.hint) from None
    return Candidate(row["backbone"], size, mode, row.get("screen"), tuple(sorted({**dict(defaults),
                                                                                  **dict(extra)}.items())), name)


def read_candidates(path: str | Path) -> tuple[list[Candidate], dict[str, Any]]:
    """The ``[[candidate]]`` tables of a TOML file (plus optional ``[defaults]``: training keys for
    every candidate, and top-level ``rungs`` / ``eta``). Returns (candidates, top-level settings)."""
    from .train import read_toml_file

    path = Path(path)
    doc = read_toml_file(path, "--candidates")
    unknown = [k for k in doc if k not in ("candidate", "defaults", "rungs", "eta")]
    if unknown:
        raise EdgetlError(f"--candidates {path}: unknown key {unknown[0]!r}",
                          hint="top level: rungs, eta, [defaults] and [[candidate]] tables")
    defaults = _train_keys(doc.get("defaults") or {}, f"{path} [defaults]")
    rows = doc.get("candidate")
    if not isinstance(rows, list) or not rows:
        raise EdgetlError(f"--candidates {path}: no [[candidate]] tables",
                          hint='add at least one: [[candidate]] backbone = "efficientnet_lite0" input_size = 224')
    cands = [_one_candidate(row, i, path, defaults) for i, row in enumerate(rows)]
    names = [c.name for c in cands]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise EdgetlError(f"--candidates {path}: two candidates are named {dup!r}", hint="give each a distinct name")
    return cands, {k: doc[k] for k in ("rungs", "eta") if k in doc}


def unavailable(cand: Candidate, pretrained: str, profile, cache: dict[str, str | None]) -> str | None:
    """Why ``cand`` cannot be trained for ``profile`` here (its weights are not available offline, the
    profile fixes another input size), or None."""
    from .backbones import get_backbone

    entry = get_backbone(cand.backbone)
    weights = dict(cand.train).get("weights")
    if pretrained == "imagenet" and entry.has_pretrained and (cand.backbone, weights) not in cache:
        try:
            entry.build("imagenet", weights)
            cache[(cand.backbone, weights)] = None
        except EdgetlError as exc:
            cache[(cand.backbone, weights)] = f"{cand.backbone} ImageNet weights are not available here: {exc.message}"
    if pretrained == "imagenet" and not entry.has_pretrained:
        return f"{cand.backbone} has no pretrained weights (use --pretrained none)"
    why = cache.get((cand.backbone, weights)) if pretrained == "imagenet" else None
    size = cand.input_size or entry.preprocess.input_size[0]
    if why is None and profile.input_size and tuple(profile.input_size) != (size, size):
        why = f"the target {profile.name} wants input_size {list(profile.input_size)}, the candidate is {size}"
    return why


# ------------------------------------------------------------------------------------------
# settings, budgets, the plan
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    fps: float | None = None
    max_mb: float | None = None
    hours: float | None = None

    @property
    def limit_ms(self) -> float | None:
        """The latency a frame may take: --latency-ms, and 1000 / --fps (batch-1, one frame after another)."""
        limits = [v for v in (self.latency_ms, 1000.0 / self.fps if self.fps else None) if v is not None]
        return min(limits) if limits else None

    def check(self) -> "Budget":
        for flag, v in (("--latency-ms", self.latency_ms), ("--fps", self.fps), ("--max-mb", self.max_mb),
                        ("--hours", self.hours)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise EdgetlError(f"{flag} {v:g} is not valid", hint=f"give a positive number, e.g. {flag} 10")
        if self.limit_ms is None and self.max_mb is None:
            raise EdgetlError("no budget given: pass --latency-ms, --fps and/or --max-mb",
                              hint="e.g. --latency-ms 10 (frame-to-label p50 on the target)")
        return self


@dataclass
class Settings:
    """Everything the search does besides the candidates (what ``search_plan.json`` records, plus how
    to measure)."""

    data: str
    out: Path
    profile: Any  # TargetProfile
    rungs: tuple[int, ...] = DEFAULT_RUNGS
    eta: int = DEFAULT_ETA
    pretrained: str = "imagenet"
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys for every candidate (device, seed...)
    method: str | None = None
    speed_check: bool = True
    compile_overrides: dict[str, Any] = field(default_factory=dict)  # calib_min, calib_size, ...
    compile_time_budget: float | None = None
    threads: int = 2
    reps: int = 100

    def check(self) -> "Settings":
        if not self.rungs or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in self.rungs):
            raise EdgetlError(f"--rungs {','.join(map(str, self.rungs))}: give the epochs of each rung, whole "
                              "numbers >= 1", hint="e.g. --rungs 2,6 (2 epochs for all, 6 for the best third)")
        if list(self.rungs) != sorted(self.rungs):
            raise EdgetlError(f"--rungs {','.join(map(str, self.rungs))}: each rung must train at least as long "
                              "as the one before", hint="e.g. --rungs 1,3,9")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise EdgetlError(f"--eta {self.eta}: must be a whole number >= 2 (keep 1/eta of the candidates per rung)",
                              hint="e.g. --eta 3")
        if self.threads < 1 or self.reps < 10:
            raise EdgetlError("--threads must be >= 1 and --reps >= 10")
        return self


def rung_config(cand: Candidate, rung: int, s: Settings):
    """The resolved TrainConfig of ``cand`` at ``rung`` (raises EdgetlError naming the candidate)."""
    from .train import TrainConfig, validate_config

    mode = cand.mode_at(rung)
    keys = {**s.base, **dict(cand.train)}
    cached = mode == "feature-extract" and not keys.get("augment")
    epochs = s.rungs[rung] * (FE_FACTOR if cached else 1)
    folder = s.out / CANDIDATES_DIR / cand.name / f"rung-{rung + 1}"
    try:
        cfg = TrainConfig(**{**keys, "data": s.data, "out": str(folder), "backbone": cand.backbone, "mode": mode,
                             "pretrained": s.pretrained, "epochs": epochs,
                             "input_size": [cand.input_size] * 2 if cand.input_size else None,
                             "cache_dir": str(s.out / FEATURE_CACHE) if cached else None})
        if mode != "feature-extract":
            cfg = dataclasses.replace(cfg, cache=None)
        return validate_config(cfg)
    except EdgetlError as exc:
        raise EdgetlError(f"candidate {cand.name}: {exc.message}", hint=exc.hint) from None


def make_plan(s: Settings, cands: Sequence[Candidate], fingerprint: str) -> dict[str, Any]:
    def recipe(cfg) -> dict[str, Any]:
        return {k: v for k, v in cfg.to_dict().items() if k not in _MAY_DIFFER}

    return {"format": 1, "kind": "edgetl search", "data_fingerprint": fingerprint,
            "target": s.profile.to_dict(), "rungs": list(s.rungs), "eta": s.eta, "pretrained": s.pretrained,
            "compile": {"method": s.method, "speed_check": s.speed_check, **s.compile_overrides},
            "candidates": [{**c.to_dict(), "runs": [recipe(rung_config(c, r, s)) for r in range(len(s.rungs))]}
                           for c in cands]}


_PLAN_WORDS = {"data_fingerprint": "data (its images differ)", "target": "target profile (--target/--set)",
               "rungs": "--rungs", "eta": "--eta", "pretrained": "--pretrained", "candidates": "candidate set",
               "compile": "compile settings (--method, --calib-*, --no-speed-check)"}


def prepare_out(out: Path, plan: dict[str, Any], overwrite: bool) -> list[str]:
    """Create OUT (or take up the search there) and write the plan. Call with OUT's lock held."""
    from .artifact import take_up_plan_folder

    notes = take_up_plan_folder(out, plan, overwrite, "search", PLAN_FILE, _PLAN_WORDS)
    (out / CANDIDATES_DIR).mkdir(parents=True, exist_ok=True)
    return notes


# ------------------------------------------------------------------------------------------
# latency: measured here, from the user's table, or unknown
# ------------------------------------------------------------------------------------------

def _arch(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def local_row(profile) -> tuple[str | None, str]:
    """(the ``edgetl bench`` row that times ``profile``'s deployed model here, or None; why not)."""
    here = _arch(platform.machine())
    want = _arch(profile.hardware.cpu_arch or here)
    if profile.backend == "tensorrt":
        return None, "TensorRT engines are built and timed on the device"
    if profile.backend == "openvino" and profile.openvino.device != "CPU":
        return None, f"the target runs on the OpenVINO {profile.openvino.device} device"
    if want != here:
        return None, f"the target's CPU is {want}, this machine's is {here}"
    int8 = profile.precision == "int8"
    return {"onnxruntime": "ort-int8" if int8 else "ort-fp32", "openvino": "ov-int8" if int8 else "ov-f32"}[
        profile.backend], ""


def read_latency_table(path: str | Path, names: Sequence[str]) -> dict[str, float]:
    """``candidate,latency_ms`` rows (header required; other columns ignored): the frame-to-label p50
    each candidate's artifact took on the device."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EdgetlError(f"--latency-table {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetlError(f"--latency-table {path}: cannot read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    cols = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
    if "candidate" not in cols or "latency_ms" not in cols:
        raise EdgetlError(f"--latency-table {path}: needs the columns candidate,latency_ms (has: {', '.join(cols)})",
                          hint="one row per candidate: its name as search.json spells it, and the p50 in ms")
    table: dict[str, float] = {}
    for i, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        name, value = row.get("candidate", ""), row.get("latency_ms", "")
        if name not in names:
            raise EdgetlError(f"--latency-table {path} line {i}: no candidate named {name!r}",
                              hint=f"the candidates are: {', '.join(names)}")
        try:
            ms = float(value)
        except ValueError:
            ms = float("nan")
        if not (ms > 0 and math.isfinite(ms)):
            raise EdgetlError(f"--latency-table {path} line {i}: latency_ms {value!r} is not a positive number")
        table[name] = ms
    return table


def model_mb(artifact: Path, manifest) -> float:
    """The deployed model on disk: the target build's file(s), else the INT8 (or float) ONNX."""
    backend = (manifest.target or {}).get("backend")
    entry = next((b for b in manifest.builds if b.get("backend") == backend), None)
    files = [artifact / entry["model"]] if entry else []
    if files and files[0].suffix == ".xml":
        files.append(files[0].with_suffix(".bin"))
    files = [f for f in files if f.is_file()] or [f for f in (artifact / "model_int8.onnx",
                                                             artifact / "model_fp32.onnx") if f.is_file()][:1]
    return sum(f.stat().st_size for f in files) / 1e6


def measure_latency(artifact: Path, row: str, s: Settings) -> dict[str, Any]:
    """The bench's frame-to-label latency of the one row that is the target's deployed model."""
    from .bench import run_bench

    res = run_bench(artifact, rows=(row,), threads=s.threads, reps=s.reps, rounds=5, chart=False)
    r = res["rows"].get(row)
    if r is None:
        raise EdgetlError(f"{artifact}: the bench row {row} cannot run here ({res['skipped'].get(row, '?')})")
    thr = next((v for k, v in r.items() if k.startswith("throughput_")), None)
    return {"ms": r["latency_p50_ms"], "p90_ms": r["latency_p90_ms"], "throughput_img_s": thr,
            "source": f"measured here: edgetl bench row {row}, frame-to-label p50, {s.threads} threads",
            "cpu_class": res["machine"]["cpu_class"], "busy_warning": res.get("busy_warning")}


# ------------------------------------------------------------------------------------------
# the steps: train a rung, promote, compile, time
# ------------------------------------------------------------------------------------------

class Clock:
    """The --hours budget across invocations (the time spent before is kept in OUT)."""

    def __init__(self, out: Path, hours: float | None):
        self.path, self.hours = out / STATE_FILE, hours
        try:
            self.before = float(json.loads(self.path.read_text()).get("elapsed_s", 0.0))
        except (OSError, ValueError, AttributeError):
            self.before = 0.0
        self.t0 = time.time()

    def spent(self) -> float:
        return self.before + time.time() - self.t0

    def left(self) -> float | None:
        return None if self.hours is None else self.hours * 3600 - self.spent()

    def save(self) -> None:
        from .runtime.manifest import atomic_write

        atomic_write(self.path, json.dumps({"elapsed_s": round(self.spent(), 1)}) + "\n")

    def text(self) -> str:
        def hm(sec: float) -> str:
            return f"{int(sec // 3600)}:{int(sec % 3600 // 60):02d}"
        left = self.left()
        return f"{hm(self.spent())} spent" + (f", {hm(max(0.0, left))} left of {hm(self.hours * 3600)}"
                                              if left is not None else "")


def _finished_run(folder: Path) -> bool:
    from .runtime.manifest import open_verified

    try:
        open_verified(folder, "run", hint="")
        return True
    except (EdgetlError, OSError, ValueError):
        return False


def train_rung(cand: Candidate, rung: int, s: Settings, rep) -> dict[str, Any]:
    """Train (or keep, or resume) ``cand``'s run folder of ``rung``; its validation and test figures."""
    from .runs import CHECKPOINT_FILE, METRICS_FILE, partial_dir
    from .train import run_training

    cfg = rung_config(cand, rung, s)
    folder = Path(cfg.out)
    t0 = time.time()
    status = "kept (finished before)"
    if not _finished_run(folder):
        resume = (partial_dir(folder) / CHECKPOINT_FILE).is_file()
        status = "resumed" if resume else "trained"
        run_training(cfg, resume=resume, overwrite=True, reporter=rep)
    m = json.loads((folder / METRICS_FILE).read_text())
    val, test = m.get("val") or {}, m.get("test") or {}
    return {"rung": rung + 1, "mode": cfg.mode, "epochs": cfg.epochs, "run": str(folder.relative_to(s.out)),
            "status": status, "metric": cfg.metric, "val_metric": val.get(cfg.metric),
            "val_accuracy": val.get("accuracy"), "val_macro_f1": val.get("macro_f1"),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "best_epoch": m.get("best_epoch"), "train_time_s": round(float(m.get("train_time_s", 0.0)), 1),
            # the whole run: data, feature pass, epochs, evaluation (kept in metrics.json, so a resume keeps it)
            "total_time_s": round(float(m.get("total_time_s", m.get("train_time_s", 0.0))), 1),
            "wall_s": round(time.time() - t0, 1)}


def promote(scores: Sequence[tuple[str, float | None]], keep: int) -> list[str]:
    """The ``keep`` names with the highest validation score (None = failed: last); ties keep the
    candidates' order. The successive-halving step."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i][1] is None, -(scores[i][1] or 0.0), i))
    return [scores[i][0] for i in sorted(order[:keep])]


def compile_candidate(cand: Candidate, run: Path, s: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Compile ``run`` for the target into ``candidates/NAME/artifact`` (kept when it verifies) and read
    the verdict back from its manifest."""
    from .check import decisive, deployable
    from .compile import compile_run
    from .runtime.manifest import atomic_write, open_verified

    folder = s.out / CANDIDATES_DIR / cand.name
    art, record = folder / "artifact", folder / "compile.json"
    source = _digest(run, "run")
    try:
        manifest = open_verified(art, "artifact", hint="")
        done = json.loads(record.read_text())
        if done.get("run_digest") != source:  # compiled from another run (retrained since): compile again
            raise EdgetlError("stale artifact")
        status = "kept (compiled before)"
    except (EdgetlError, OSError, ValueError):
        t0 = time.time()
        compile_run(run, art, s.profile, s.method, s.speed_check, overwrite=True, progress=progress,
                    time_budget=s.compile_time_budget, **s.compile_overrides)
        done = {"seconds": round(time.time() - t0, 1), "run": str(run.relative_to(s.out)), "run_digest": source}
        atomic_write(record, json.dumps(done) + "\n")
        manifest = open_verified(art, "artifact", hint="")
        status = "compiled"
    what, gate = decisive(manifest)
    gate = dict(gate or {})
    return {"artifact": str(art.relative_to(s.out)), "status": status, "seconds": done.get("seconds"),
            "deployable": deployable(manifest), "decided_by": what, "method": (manifest.quantization or {}).get("method"),
            "gate": {k: gate.get(k) for k in ("passed", "float_top1", "quant_top1", "drop", "agreement", "failures")},
            "size_mb": round(model_mb(art, manifest), 3)}


def time_candidate(cand: Candidate, s: Settings, table: Mapping[str, float], row: str | None,
                   why_not: str) -> dict[str, Any]:
    """The candidate's latency: the user's table, a measurement here (kept in bench.json), or unknown."""
    from .runtime.manifest import atomic_write

    if cand.name in table:
        return {"ms": table[cand.name], "source": "--latency-table"}
    if row is None:
        return {"ms": None, "source": f"unknown: {why_not}; pass --latency-table (edgetl bench on the device)"}
    folder = s.out / CANDIDATES_DIR / cand.name
    record = folder / "bench.json"
    try:
        kept = json.loads(record.read_text())
        if kept.get("artifact_digest") == _digest(folder / "artifact") and kept.get("ms"):
            return {**kept, "status": "kept (measured before)"}
    except (OSError, ValueError):
        pass
    lat = {**measure_latency(folder / "artifact", row, s), "artifact_digest": _digest(folder / "artifact")}
    atomic_write(record, json.dumps(lat) + "\n")
    return {**lat, "status": "measured"}


def _digest(folder: Path, kind: str = "artifact") -> str | None:
    """The folder's manifest digest (one id for every file in it), or None when it does not verify."""
    from .runtime.manifest import open_verified

    try:
        return open_verified(folder, kind, hint="").digest
    except (EdgetlError, OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------
# the choice, the Pareto front, the table and the plot
# ------------------------------------------------------------------------------------------

def verdict(rec: dict[str, Any], budget: Budget) -> tuple[bool, str]:
    """(whether a finalist may be chosen, the reason it may not / "within budget")."""
    comp, lat = rec.get("compile") or {}, rec.get("latency") or {}
    if comp.get("error"):
        return False, f"compile failed: {comp['error']}"
    if not comp.get("deployable"):
        fails = (comp.get("gate") or {}).get("failures") or []
        return False, "NOT deployable (gate failed" + (f": {fails[0]}" if fails else "") + ")"
    limit = budget.limit_ms
    if limit is not None and lat.get("ms") is None:
        return False, "latency unknown"
    if limit is not None and lat["ms"] > limit:
        return False, f"over budget: {lat['ms']:.2f} ms > {limit:.2f} ms"
    if budget.max_mb is not None and comp.get("size_mb", 0) > budget.max_mb:
        return False, f"over budget: {comp['size_mb']:.2f} MB > {budget.max_mb:g} MB"
    return True, "within budget"


def choose(records: Sequence[dict[str, Any]], budget: Budget) -> tuple[str | None, str]:
    """The finalist with the best validation metric among the deployable ones within the budget (ties:
    the faster, then the first); (None, why) when there is none."""
    finalists = [r for r in records if r.get("finalist")]
    ok = [r for r in finalists if verdict(r, budget)[0]]
    if ok:
        best = min(ok, key=lambda r: (-(r["val_metric"] or 0.0), (r.get("latency") or {}).get("ms") or 0.0,
                                      records.index(r)))
        return best["name"], f"the best validation {best['metric']} among {len(ok)} deployable finalist(s) within budget"
    if not finalists:
        return None, "no candidate reached the finalist stage"
    if budget.limit_ms is not None and all((r.get("latency") or {}).get("ms") is None for r in finalists):
        return None, ("latency unknown for every finalist (this machine cannot run the target): none is chosen "
                      "by latency; pass --latency-table with each finalist's frame-to-label p50 measured on the device")
    return None, "no finalist is deployable within the budget"


def pareto(records: Sequence[dict[str, Any]]) -> set[str]:
    """Names on the accuracy/latency Pareto front of the deployable finalists with a known latency (no
    other is at least as fast and at least as accurate, and better in one)."""
    pts = [(r["name"], r["latency"]["ms"], r["val_metric"]) for r in records
           if r.get("finalist") and (r.get("compile") or {}).get("deployable")
           and (r.get("latency") or {}).get("ms") is not None and r.get("val_metric") is not None]
    return {n for n, ms, acc in pts
            if not any(m2 <= ms and a2 >= acc and (m2 < ms or a2 > acc) for _, m2, a2 in pts)}


def _f(v: Any, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def format_table(result: dict[str, Any]) -> str:
    """The printed table: every candidate, the Pareto front and the chosen one marked."""
    metric = result["metric"]
    head = (f"{'':2}{'candidate':<30}{'val ' + metric:>13}{'test acc':>9}{'int8 acc':>9}{'ms p50':>8}{'MB':>7}"
            f"{'time s':>8}  status")
    lines = [f"search on {result['data']} for {result['target']} (budget: {result['budget_text']}); "
             f"rungs {result['rungs']} epochs, eta {result['eta']}", head]
    for r in result["candidates"]:
        mark = "*" if r["name"] == result["chosen"] else ("P" if r.get("pareto") else "")
        gate = (r.get("compile") or {}).get("gate") or {}
        lat = (r.get("latency") or {}).get("ms")
        lines.append(f"{mark:<2}{r['name']:<30}{_f(r.get('val_metric'), '.4f'):>13}{_f(r.get('test_accuracy'), '.4f'):>9}"
                     f"{_f(gate.get('quant_top1'), '.4f'):>9}{_f(lat, '.2f', '?' if r.get('finalist') else '-'):>8}"
                     f"{_f((r.get('compile') or {}).get('size_mb'), '.2f'):>7}{r.get('time_s', 0):>8.0f}  {r['why']}")
    lines.append("* chosen   P Pareto front (validation metric vs latency, deployable finalists with a known latency)")
    lines.append(f"chosen: {result['chosen'] or 'none'} ({result['chosen_reason']})")
    return "\n".join(lines)


def plot_pareto(result: dict[str, Any], path: Path) -> Path:
    """Validation metric vs latency of the finalists: deployable within budget (blue), over budget
    (orange triangles), not deployable (red crosses), the chosen one (green star), the front, the budget."""
    from .plots import _figure

    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot(111)
    pts = [r for r in result["candidates"] if r.get("finalist") and (r.get("latency") or {}).get("ms") is not None]
    styles = {"ok": dict(marker="o", color="tab:blue", label="deployable, within budget"),
              "over": dict(marker="^", color="tab:orange", label="over budget"),
              "bad": dict(marker="X", color="tab:red", label="NOT deployable (gate failed)")}
    used = set()
    for r in pts:
        kind = "ok" if r["within_budget"] else ("bad" if not (r.get("compile") or {}).get("deployable") else "over")
        st = dict(styles[kind])
        if kind in used:
            st.pop("label")
        used.add(kind)
        ax.scatter([r["latency"]["ms"]], [100 * r["val_metric"]], s=60, zorder=3, **st)
        ax.annotate(r["name"], (r["latency"]["ms"], 100 * r["val_metric"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
        if r["name"] == result["chosen"]:
            ax.scatter([r["latency"]["ms"]], [100 * r["val_metric"]], s=260, marker="*", color="tab:green",
                       zorder=4, label="chosen")
    front = sorted((r["latency"]["ms"], 100 * r["val_metric"]) for r in pts if r.get("pareto"))
    if len(front) > 1:
        ax.plot(*zip(*front), color="grey", linestyle=":", zorder=2, label="Pareto front")
    limit = result["budget"].get("limit_ms")
    if limit is not None:
        ax.axvline(limit, color="tab:orange", linestyle="--", label=f"latency budget {limit:g} ms")
    if not pts:
        ax.text(0.5, 0.5, "latency unknown for every finalist\n(pass --latency-table)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel(f"frame-to-label latency p50 (ms) on {result['target']}")
    ax.set_ylabel(f"validation {result['metric']} (%)")
    ax.set_title(f"edgetl search: chosen {result['chosen'] or 'none'}", fontsize=10)
    ax.grid(alpha=0.3)
    if pts or limit is not None:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def link_chosen(out: Path, rec: dict[str, Any] | None) -> None:
    """``OUT/chosen/run`` and ``OUT/chosen/artifact``: relative links to the chosen run and artifact
    (replaced whole; removed when nothing is chosen)."""
    final = out / CHOSEN_DIR
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    if rec is None:
        return
    tmp = out / f".{CHOSEN_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    os.symlink(Path("..") / rec["run"], tmp / "run")
    os.symlink(Path("..") / rec["compile"]["artifact"], tmp / "artifact")
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------
# the whole search
# ------------------------------------------------------------------------------------------

def _halving(live: Sequence[Candidate], s: Settings, clock: Clock, records: dict[str, dict[str, Any]],
             rep) -> list[Candidate]:
    """Successive halving over the rungs; returns the finalists (trained at the last rung reached)."""
    racing, previous = list(live), []
    for r in range(len(s.rungs)):
        done = []
        for i, c in enumerate(racing):
            rec = records[c.name]
            left = clock.left()
            if left is not None and left <= 0:
                rec["why"] = rec["note"] = f"not trained at rung {r + 1}: the --hours budget was spent"
                continue
            cfg = rung_config(c, r, s)
            rep.log(f"=== rung {r + 1}/{len(s.rungs)} · candidate {i + 1}/{len(racing)} {c.name} · {cfg.mode} "
                    f"{cfg.epochs} epochs · {clock.text()}")
            try:
                row = train_rung(c, r, s, rep)
            except EdgetlError as exc:  # this candidate cannot train (e.g. too small an input for its backbone)
                rec["why"] = f"training failed at rung {r + 1}: {exc.message}"
                rep.log(f"  {c.name}: {rec['why']}")
                continue
            finally:
                clock.save()
            rec["rungs"].append(row)
            rep.log(f"  {c.name} rung {r + 1}: validation {row['metric']} {_f(row['val_metric'], '.4f')} "
                    f"({row['status']}, {row['train_time_s']:.0f}s training)")
            done.append(c)
        if not done:
            return previous if r > 0 else []
        if r == len(s.rungs) - 1:
            return done
        keep = max(1, math.ceil(len(done) / s.eta))
        scores = [(c.name, records[c.name]["rungs"][-1]["val_metric"]) for c in done]
        up = promote(scores, keep)
        for name, score in scores:
            if name not in up:
                records[name]["why"] = (f"eliminated at rung {r + 1}: validation {_f(score, '.4f')} is not among "
                                        f"the best {keep} of {len(done)}")
        rep.log(f"rung {r + 1} done: promoted {', '.join(up)} ({keep} of {len(done)}, eta {s.eta}) · {clock.text()}")
        racing, previous = [c for c in done if c.name in up], [c for c in done if c.name in up]
    return racing


def _finalists(finalists: Sequence[Candidate], s: Settings, clock: Clock, records: dict[str, dict[str, Any]],
               table: Mapping[str, float], rep) -> None:
    """Compile every finalist for the target and time it (or take its latency from the table)."""
    row, why_not = local_row(s.profile)
    for i, c in enumerate(finalists):
        rec = records[c.name]
        rec["finalist"] = True
        run = s.out / rec["rungs"][-1]["run"]
        rep.log(f"=== compile {i + 1}/{len(finalists)} {c.name} for {s.profile.name} ({s.profile.backend} "
                f"{s.profile.precision}) · {clock.text()}")
        try:
            rec["compile"] = compile_candidate(c, run, s, lambda m: rep.log(f"  {m}"))
        except EdgetlError as exc:
            rec["compile"] = {"error": exc.message}
            rep.log(f"  {c.name}: compile failed: {exc.message}")
            clock.save()
            continue
        comp = rec["compile"]
        rep.log(f"  {c.name}: {'deployable' if comp['deployable'] else 'NOT deployable'} ({comp['decided_by']}), "
                f"{comp['size_mb']:.2f} MB, {comp['status']}")
        try:
            rec["latency"] = time_candidate(c, s, table, row, why_not)
        except EdgetlError as exc:
            rec["latency"] = {"ms": None, "source": f"unknown: the measurement failed ({exc.message})"}
        clock.save()
        lat = rec["latency"]
        rep.log(f"  {c.name}: latency " + (f"{lat['ms']:.2f} ms ({lat['source']})" if lat["ms"] is not None
                                            else lat["source"]))


def _budget_text(b: Budget) -> str:
    parts = [f"latency <= {b.latency_ms:g} ms" if b.latency_ms else "", f"{b.fps:g} fps" if b.fps else "",
             f"model <= {b.max_mb:g} MB" if b.max_mb else "", f"{b.hours:g} h" if b.hours else ""]
    return ", ".join(p for p in parts if p) or "none"


def summarise(s: Settings, records: dict[str, dict[str, Any]], budget: Budget, fingerprint: str,
              clock: Clock) -> dict[str, Any]:
    """search.json: every candidate (config, rungs, compile, latency, why), the front and the choice."""
    from .runtime.cpu import host_cpu

    for rec in records.values():
        last = rec["rungs"][-1] if rec["rungs"] else {}
        rec.update({"metric": last.get("metric"), "val_metric": last.get("val_metric"),
                    "test_accuracy": last.get("test_accuracy"), "run": last.get("run")})
        rec["time_s"] = round(sum(x.get("total_time_s") or 0 for x in rec["rungs"])
                              + ((rec.get("compile") or {}).get("seconds") or 0), 1)
        if rec.get("finalist"):
            rec["within_budget"], rec["why"] = verdict(rec, budget)
    front = pareto(list(records.values()))
    chosen, reason = choose(list(records.values()), budget)
    for rec in records.values():
        rec["pareto"] = rec["name"] in front
        if rec["name"] == chosen:
            rec["why"] = "CHOSEN: " + rec["why"]
    metric = next((r["metric"] for r in records.values() if r.get("metric")), "macro_f1")
    return {"format": 1, "kind": "edgetl search", "data": s.data, "data_fingerprint": fingerprint,
            "target": s.profile.name, "backend": s.profile.backend, "precision": s.profile.precision,
            "cpu_class": host_cpu().isa_class, "latency_here": local_row(s.profile)[0] is not None,
            "budget": {**dataclasses.asdict(budget), "limit_ms": budget.limit_ms}, "budget_text": _budget_text(budget),
            "rungs": list(s.rungs), "eta": s.eta, "fe_factor": FE_FACTOR, "metric": metric,
            "chosen": chosen, "chosen_reason": reason,
            "chosen_run": records[chosen]["run"] if chosen else None,
            "chosen_artifact": records[chosen]["compile"]["artifact"] if chosen else None,
            "elapsed_s": round(clock.spent(), 1), "candidates": list(records.values())}


def _validate(s: Settings, cands: Sequence[Candidate], budget: Budget, table_path, rep):
    """Everything a user can get wrong, before OUT is touched: (live candidates, skipped, fingerprint, table)."""
    from .data import load_data
    from .bench import require_chart

    s.check()
    budget.check()
    require_chart()
    data = load_data(s.data, val_fraction=s.base.get("val_fraction", 0.15),
                     test_fraction=s.base.get("test_fraction", 0.15), seed=s.base.get("split_seed", 0))
    if not data.splits["val"]:
        raise EdgetlError(f"{s.data}: no validation images: the halving compares candidates on them",
                          hint="add images, or raise --val-fraction")
    weights: dict = {}
    skipped = {c.name: why for c in cands if (why := unavailable(c, s.pretrained, s.profile, weights))}
    live = [c for c in cands if c.name not in skipped]
    if not live:
        first = next(iter(skipped.items()))
        raise EdgetlError(f"no candidate can be trained here ({first[0]}: {first[1]})",
                          hint="pass --candidates FILE with backbones whose weights are here (efficientnet_lite0/1/2), "
                               "or --pretrained none")
    table = read_latency_table(table_path, [c.name for c in cands]) if table_path else {}
    for name, why in skipped.items():
        rep.log(f"skipped {name}: {why}")
    return live, skipped, data.fingerprint, table


def run_search(s: Settings, cands: Sequence[Candidate], budget: Budget, latency_table: str | Path | None = None,
               overwrite: bool = False, reporter=None) -> dict[str, Any]:
    """The whole search into ``s.out``; returns what ``search.json`` holds. Raises NothingChosen
    (exit 1) after writing everything when no candidate is deployable within the budget."""
    from .artifact import folder_lock
    from .runtime.manifest import atomic_write
    from .train import Reporter

    rep = reporter or Reporter()
    live, skipped, fingerprint, table = _validate(s, cands, budget, latency_table, rep)
    plan = make_plan(s, live, fingerprint)
    with folder_lock(s.out):
        for note in prepare_out(s.out, plan, overwrite):
            rep.log(note)
        clock = Clock(s.out, budget.hours)
        records = {c.name: {"name": c.name, "config": c.to_dict(), "rungs": [], "finalist": False, "why": ""}
                   for c in cands}
        for name, why in skipped.items():
            records[name]["why"] = f"skipped: {why}"
        try:
            finalists = _halving(live, s, clock, records, rep)
            _finalists(finalists, s, clock, records, table, rep)
        except KeyboardInterrupt:
            rep.log(f"interrupted after {clock.text()}: finished trainings and compiles are kept in {s.out}; "
                    "run the same command again to resume")
            raise
        result = summarise(s, records, budget, fingerprint, clock)
        atomic_write(s.out / SEARCH_FILE, json.dumps(result, indent=1) + "\n")
        plot_pareto(result, s.out / PLOT_FILE)
        link_chosen(s.out, records[result["chosen"]] if result["chosen"] else None)
        shutil.rmtree(s.out / FEATURE_CACHE, ignore_errors=True)  # the runs hold what they learned
    rep.log(format_table(result))
    rep.log(f"wrote {s.out / SEARCH_FILE}, {s.out / PLOT_FILE}" + (f", {s.out / CHOSEN_DIR}" if result["chosen"] else ""))
    if result["chosen"] is None:
        raise NothingChosen(f"edgetl search: no candidate chosen: {result['chosen_reason']}",
                            hint=f"the table and {s.out / SEARCH_FILE} say why for each candidate")
    return result
