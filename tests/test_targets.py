"""Target profiles: bundled ones load, bad files are refused naming the key and file, hardware facts refuse."""

from __future__ import annotations

import pytest

from edgetl.cli import main
from edgetl.targets import (TargetError, TargetProfile, apply_overrides, list_targets, load_target, to_toml)

REQUIRED = {"jetson-nano", "jetson-xavier-nx", "jetson-agx-orin", "jetson-orin-nano", "x86-cpu-openvino",
            "intel-igpu-openvino", "x86-cpu-onnxruntime", "arm64-cpu-onnxruntime"}


def user_toml(tmp_path, text: str, name: str = "board.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = 'name = "board"\ndescription = "my board"\nbackend = "onnxruntime"\nprecision = "int8"\n'


def test_bundled_profiles_load_and_round_trip():
    profiles = {t.name: t for t in list_targets()}
    assert REQUIRED <= set(profiles)
    for t in profiles.values():
        assert t.description and t.backend in ("tensorrt", "openvino", "onnxruntime")
        back = TargetProfile.from_dict(t.to_dict(), source="round trip")
        assert back.to_dict() == t.to_dict()
    assert profiles["jetson-nano"].precision == "fp16" and not profiles["jetson-nano"].hardware.int8_capable
    assert profiles["jetson-orin-nano"].hardware.dla_cores == 0
    assert profiles["jetson-agx-orin"].hardware.dla_cores == 2


def test_x86_openvino_profile_pins_inference_precision():
    # on bf16-capable CPUs "default" silently means bf16: the x86 profile must say what it measures
    assert load_target("x86-cpu-openvino").openvino.inference_precision == "f32"


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    p = user_toml(tmp_path, BASE + "presicion = \"fp32\"\n")
    with pytest.raises(TargetError) as e:
        load_target(p)
    assert "presicion" in e.value.message and str(p) in e.value.message


def test_unknown_section_key_names_key_and_file(tmp_path):
    p = user_toml(tmp_path, BASE + "[tensorrt]\nworkspace = 512\n")
    with pytest.raises(TargetError) as e:
        load_target(p)
    assert "tensorrt.workspace" in e.value.message and str(p) in e.value.message
    assert "workspace_mb" in e.value.hint  # the known keys are listed


def test_unknown_section_named(tmp_path):
    p = user_toml(tmp_path, BASE + "[tensorrtt]\nworkspace_mb = 512\n")
    with pytest.raises(TargetError, match="tensorrtt"):
        load_target(p)


def test_wrong_type_and_bad_value_named(tmp_path):
    with pytest.raises(TargetError, match="tensorrt.workspace_mb"):
        load_target(user_toml(tmp_path, BASE + "[tensorrt]\nworkspace_mb = \"big\"\n", "a.toml"))
    with pytest.raises(TargetError, match="openvino.inference_precision"):
        load_target(user_toml(tmp_path, BASE + "[openvino]\ninference_precision = \"fp32\"\n", "b.toml"))
    with pytest.raises(TargetError, match="missing key 'backend'"):
        load_target(user_toml(tmp_path, 'name = "x"\ndescription = "y"\nprecision = "int8"\n', "c.toml"))
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(user_toml(tmp_path, "name = ", "d.toml"))


def test_unknown_target_name_lists_bundled():
    with pytest.raises(TargetError) as e:
        load_target("jetson-tx3")
    assert "jetson-agx-orin" in e.value.hint


def test_int8_on_jetson_nano_refused_with_reason(tmp_path):
    nano = load_target("jetson-nano")
    with pytest.raises(TargetError) as e:
        apply_overrides(nano, precision="int8")
    assert "int8 is refused" in e.value.message and "Maxwell" in e.value.message
    # the same from a user's TOML: a copy of the Nano profile asking for int8
    p = user_toml(tmp_path, to_toml(nano).replace('precision = "fp16"', 'precision = "int8"'), "nano8.toml")
    with pytest.raises(TargetError, match="no INT8 tensor cores"):
        load_target(p)


def test_dla_rules():
    orin = load_target("jetson-agx-orin")
    dla = apply_overrides(orin, sets=["tensorrt.dla_core=1"])
    assert dla.tensorrt.dla_core == 1
    with pytest.raises(TargetError, match="0..1"):
        apply_overrides(orin, sets=["tensorrt.dla_core=2"])
    with pytest.raises(TargetError, match="static shapes"):
        apply_overrides(dla, sets=['batch="dynamic"'])
    with pytest.raises(TargetError, match="int8 or fp16"):
        apply_overrides(dla, precision="fp32")
    with pytest.raises(TargetError, match="no DLA"):
        apply_overrides(load_target("jetson-orin-nano"), sets=["tensorrt.dla_core=0"])


def test_contradictions_refused():
    ov = load_target("x86-cpu-openvino")
    with pytest.raises(TargetError, match="contradicts"):
        apply_overrides(ov, precision="fp32", sets=['openvino.inference_precision="bf16"'])
    with pytest.raises(TargetError, match="onnxruntime backend builds int8"):
        apply_overrides(load_target("x86-cpu-onnxruntime"), precision="fp16", sets=["hardware.fp16_capable=true"])
    with pytest.raises(TargetError, match="no fast FP16"):
        apply_overrides(load_target("x86-cpu-onnxruntime"), precision="fp16")
    with pytest.raises(TargetError, match="KEY=VALUE"):
        apply_overrides(ov, sets=["openvino.device"])


def test_options_for_backend_is_the_runner_options():
    ort = load_target("arm64-cpu-onnxruntime").options_for()
    assert ort == {"providers": ["CPUExecutionProvider"], "intra_op_threads": 4, "graph_optimization_level": "all"}


def test_input_size_check(tmp_path):
    p = load_target(user_toml(tmp_path, BASE + "input_size = [224, 224]\n"))
    p.check_input_size((224, 224))
    with pytest.raises(TargetError, match="input_size"):
        p.check_input_size((32, 32))


def test_cli_lists_and_shows(capsys, tmp_path):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out
    assert "Maxwell" in out  # the one-line descriptions are printed
    p = user_toml(tmp_path, BASE + "[onnxruntime]\nintra_op_threads = 3\n")
    assert main(["targets", "show", str(p)]) == 0
    shown = capsys.readouterr().out
    assert "intra_op_threads = 3" in shown and "[tensorrt]" not in shown
    # what `show` prints is itself a valid profile that resolves to the same thing
    again = load_target(user_toml(tmp_path, shown, "again.toml"))
    assert again.to_dict() == load_target(p).to_dict()
    assert main(["targets", "show", "jetson-nano", "--precision", "int8"]) == 2
    assert "refused" in capsys.readouterr().err
