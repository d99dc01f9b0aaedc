"""`qlnas bench train-step` (make bench): every model in its own processes, ratios to resnet50."""

import json

import pytest

from qlnas.bench.train_step import main


@pytest.mark.slow
def test_speed_table_side_by_side(tmp_path, capsys):
    models = ["resnet50", "qlnet26n_eq3_softball_ds"]
    assert main(["--models", *models, "--resolution", "32", "--batch", "4", "--warmup", "0",
                 "--steps", "1", "--label", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["complete"] and (tmp_path / "tiny.png").stat().st_size > 0
    assert result["config"]["allocator"] == "keep"
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == set(models)
    base, ql = rows["resnet50"], rows["qlnet26n_eq3_softball_ds"]
    assert base["train_ratio"] == 1.0 and base["infer_ratio"] == 1.0
    for phase in ("train", "infer"):
        assert ql[f"{phase}_img_s"] > 0 and ql[f"{phase}_peak_mb"] >= 0
        assert ql[f"{phase}_ratio"] == pytest.approx(ql[f"{phase}_img_s"] / base[f"{phase}_img_s"])
        assert ql[f"{phase}_mac_ratio"] == pytest.approx(
            ql[f"{phase}_ratio"] * ql["gmacs"] / base["gmacs"])
    assert 0 < ql["gmacs"] < base["gmacs"]
    out = capsys.readouterr().out
    assert "train_x_r50" in out and "targets:" in out


def test_bad_setting_is_one_line(capsys):
    assert main(["--resolution", "0", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: BenchConfig.resolution=0; expected >= 1"]
