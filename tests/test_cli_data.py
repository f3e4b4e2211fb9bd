from edgetl.cli import main


def test_data_elpv_binary(tmp_path, capsys):
    out = tmp_path / "elpv"
    assert main(["data", "elpv", str(out), "--cell-type", "mono"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["defective", "functional"]
    n_def = len(list((out / "defective").glob("*.png")))
    n_ok = len(list((out / "functional").glob("*.png")))
    assert (n_def, n_ok) == (56 + 313, 588 + 117)  # mono cells: p >= 0.5 vs p < 0.5
    # a second run refuses to clobber, and leaves no partial folder behind
    assert main(["data", "elpv", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["elpv"]
