"""Suite-wide settings.

MLORA_PP_COMPILE=0: every rank process would otherwise compile the dropout kernel
(torch.compile, about 3 s with a warm cache and more on a fresh machine), which added three
minutes to the suite. Ranks started by tests inherit it. The compiled kernel is checked against
the eager one, bit for bit, in test_lora_op.py (which turns it back on there), and `make demo`
runs with it.

Under pytest-xdist, each worker's torch gets its share of the cores: two workers on 2 cores with
torch's default of one thread a core had OpenMP threads spinning against each other, and the
one-rank random-changes tests, run by themselves, took 154 s instead of 34 s. (The whole suite
ran with one thread already, by a side effect: test_memory_model sets it as it is collected.)
"""

import os

os.environ.setdefault("MLORA_PP_COMPILE", "0")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
