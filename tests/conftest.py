import os

import pytest
import torch
from hypothesis import settings
from tiny_run import write_tiny_config

from lipcert.cli import main

# Two cores on the CI machine: keep every test single-threaded and small.
torch.set_num_threads(int(os.environ.get("LIPCERT_TEST_THREADS", "1")))
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One trained tiny digits run (``run/`` under the returned folder), trained once for the
    bad-input catalogues, which link it into their own folders and only read it."""
    root = tmp_path_factory.mktemp("tiny_run")
    config = write_tiny_config(root)
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return root
