from tiny_run import write_tiny_config

from lipcert.bench.certify import _quartiles, measure
from lipcert.cli import main


def test_bench_certify_times_eval_and_certify_on_the_test_split(tmp_path):
    config = write_tiny_config(tmp_path)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    row = measure(str(tmp_path / "run" / "last.safetensors"), repeats=1, pairs=2)
    assert row["points"] > 0 and row["eval_s"] > 0
    assert row["certify_cold_s"] > 0 and row["certify_warm_s"] > 0 and row["eval_cold_s"] > 0
    assert row["cold_ratio_to_cold_eval"] == row["certify_cold_s"] / row["eval_cold_s"]
    q1, q3 = row["warm_ratio_quartiles"]
    assert 0 < q1 <= q3 and row["rounds"] == 2
    assert 0 <= row["accuracy"][0.1] <= row["accuracy"][0.0] <= 1
    paired = measure(str(tmp_path / "run" / "last.safetensors"), repeats=3, pairs=1)
    c1, c3 = paired["cold_ratio_quartiles"]
    assert paired["cold_pairs"] == 3 and 0 < c1 <= paired["cold_ratio_to_cold_eval"] <= c3


def test_quartiles_stay_within_the_measured_ratios():
    """Two noisy rounds of a tiny model (ratios 0.5 and 5) gave a first quartile of -0.625 with
    statistics' default "exclusive" method, which extrapolates (CI failed on it)."""
    assert _quartiles([0.5, 5.0]) == (1.625, 3.875)
    assert _quartiles([2.0]) == (2.0, 2.0)
    q1, q3 = _quartiles([1.0, 1.1, 0.9, 3.0])
    assert 0.9 <= q1 <= q3 <= 3.0
