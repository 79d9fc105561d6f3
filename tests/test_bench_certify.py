from lipcert.bench.certify import measure
from lipcert.cli import main

CONFIG = """
name = "tiny"
epochs = 1
[data]
dataset = "digits"
[model]
name = "sll_mlp"
kwargs = { width = 16, inner_width = 16, depth = 1 }
[loss]
name = "multiclass_hkr"
kwargs = { alpha = 10.0, margin = 0.2 }
[certify]
eps = [0.1]
"""


def test_bench_certify_times_eval_and_certify_on_the_test_split(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    row = measure(str(tmp_path / "run" / "last.safetensors"), repeats=1)
    assert row["points"] > 0 and row["eval_s"] > 0
    assert row["certify_cold_s"] > 0 and row["certify_warm_s"] > 0
    assert 0 <= row["accuracy"][0.1] <= row["accuracy"][0.0] <= 1
