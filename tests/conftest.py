import os

import torch
from hypothesis import settings

# Two cores on the CI machine: keep every test single-threaded and small.
torch.set_num_threads(int(os.environ.get("LIPCERT_TEST_THREADS", "1")))
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
