"""Ratios to resnet50, the printed columns and the targets of the train-step table."""

import pytest

from qlnas.bench.report import add_ratios, table_rows, targets


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
    got = targets(add_ratios(rows()))
    assert got["eq3_train_met"] and not got["eq3_infer_met"]  # 2.1 >= 2.0, 2.0 < 2.2
    assert got["eq3_train_ratio"] == pytest.approx(2.1)
    assert got["per_mac_train_below_0.8"] == ["qlnet50_eq3_softball_ds"]  # 2.1 x 1.2 / 4 GMACs
    assert got["per_mac_infer_below_0.8"] == ["qlnet50_eq3_softball_ds"]  # 2.0 x 1.2 / 4
