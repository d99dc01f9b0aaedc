"""Ratios to resnet50, the printed columns and the targets of the train-step table."""

import json

import pytest

from qlnas.bench.report import add_ratios, best_of, best_table, table_rows, targets
from qlnas.bench.report import main as report_main


def rows():
    return [
        {"model": "resnet50", "params_m": 23.7, "gmacs": 4.0, "train_img_s": 10.0,
         "train_peak_mb": 100.0, "infer_img_s": 40.0, "infer_peak_mb": 10.0},
        {"model": "qlnet50_eq3_softball_ds", "params_m": 8.61, "gmacs": 1.2,
         "train_img_s": 21.0, "train_peak_mb": 90.0, "infer_img_s": 80.0, "infer_peak_mb": 9.0},
        {"model": "broken", "error": "exit 1: boom"},
    ]


def test_ratios_are_speed_and_speed_per_mac_against_the_baseline():
    base, eq3, broken = add_ratios(rows())
    assert base["train_ratio"] == 1.0 and base["infer_mac_ratio"] == 1.0
    assert eq3["train_ratio"] == pytest.approx(2.1) and eq3["infer_ratio"] == pytest.approx(2.0)
    assert eq3["train_mac_ratio"] == pytest.approx(2.1 * 1.2 / 4.0)
    assert "train_ratio" not in broken
    assert all("train_ratio" not in r for r in add_ratios(rows()[1:]))  # no baseline, no ratio


def test_printed_rows_share_columns_and_keep_errors():
    printed = table_rows(add_ratios(rows()))
    assert len({tuple(r) for r in printed}) == 1  # one header for all
    assert printed[1]["train_x_r50"] == 2.1 and printed[1]["gmacs"] == 1.2
    assert printed[2]["error"] == "exit 1: boom" and printed[2]["train_img_s"] == ""


def test_targets_say_which_are_met():
    got = targets(add_ratios(rows()))  # CPU: Eq.(3) softball trains at >= 2.0x
    assert got == {"eq3_train_ratio": pytest.approx(2.1), "eq3_train_met": True}
    slow = add_ratios([dict(r, train_img_s=19.0) if r["model"].startswith("qlnet") else r
                       for r in rows()])
    assert not targets(slow)["eq3_train_met"]  # 1.9x


def test_gpu_targets_name_both_headline_models_and_every_slow_row():
    gpu_rows = rows() + [
        {"model": "qlnet50_glb_softball_ds", "params_m": 8.0, "gmacs": 1.1,
         "train_img_s": 13.0, "train_peak_mb": 1.0, "infer_img_s": 50.0, "infer_peak_mb": 1.0},
        {"model": "qlnet50_eq5_softball_ds", "params_m": 8.0, "gmacs": 0.9,
         "train_img_s": 9.0, "train_peak_mb": 1.0},
    ]
    got = targets(add_ratios(gpu_rows), "cuda")
    assert got["eq3_train_met"] and got["eq3_infer_met"]  # 2.1x, 2.0x
    assert got["glb_train_met"] and not got["glb_infer_met"]  # 1.3x, 1.25x
    assert got["train_below_1.0"] == ["qlnet50_eq5_softball_ds"]  # 0.9x
    assert "broken" not in got["train_below_1.0"]


def result(label, compiled, speeds):
    return {"label": label, "config": {"device": "cuda", "compile": compiled},
            "machine": {}, "rows": [
                {"model": m, "params_m": 1.0, "gmacs": 2.0, "train_img_s": t, "train_peak_mb": 1,
                 "train_first_s": 60.0 if compiled else 0.5, "infer_img_s": i,
                 "infer_peak_mb": 1, "infer_first_s": 30.0 if compiled else 0.1}
                if t else {"model": m, "error": "timed out after 60 s"}
                for m, (t, i) in speeds.items()]}


def test_best_of_eager_and_compiled_takes_each_phase_from_its_faster_run():
    eager = result("eager", False, {"resnet50": (100.0, 300.0), "qlnet50_eq3_softball_ds":
                                    (150.0, 500.0), "qlnet50_eq4_softball_ds": (90.0, 200.0)})
    compiled = result("compile", True, {"resnet50": (110.0, 290.0), "qlnet50_eq3_softball_ds":
                                        (200.0, 450.0), "qlnet50_eq4_softball_ds": (None, 0)})
    best = {r["model"]: r for r in best_of([eager, compiled])}
    r50, eq3 = best["resnet50"], best["qlnet50_eq3_softball_ds"]
    eq4 = best["qlnet50_eq4_softball_ds"]
    assert (r50["train_img_s"], r50["train_from"]) == (110.0, "compile")
    assert r50["train_compile_s"] == 60.0
    assert (r50["infer_img_s"], r50["infer_from"]) == (300.0, "eager")
    assert "infer_compile_s" not in r50
    assert eq3["train_ratio"] == pytest.approx(200 / 110)
    assert eq3["infer_ratio"] == pytest.approx(500 / 300)
    assert eq4["train_from"] == "eager" and "error" not in eq4  # compiled run timed out
    printed = best_table(best_of([eager, compiled]))
    assert printed[0]["train_compile_s"] == 60.0 and printed[0]["infer_compile_s"] == ""


def test_best_cli_writes_the_merge_and_refuses_mixed_devices(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result("eager", False, {"resnet50": (100.0, 300.0)})))
    b.write_text(json.dumps(result("compile", True, {"resnet50": (120.0, 280.0)})))
    assert report_main(["--best", str(a), str(b), "--label", "m", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["sources"] == ["eager", "compile"]
    assert merged["rows"][0]["train_img_s"] == 120.0 and "targets: " in capsys.readouterr().out
    cpu = result("cpu", False, {"resnet50": (1.0, 1.0)})
    cpu["config"]["device"] = "cpu"
    b.write_text(json.dumps(cpu))
    assert report_main(["--best", str(a), str(b), "--out", str(tmp_path)]) == 2
    assert "mixes devices" in capsys.readouterr().err
