"""Suite-wide settings.

MLORA_PP_COMPILE=0: every rank process would otherwise compile the dropout kernel
(torch.compile, about 3 s with a warm cache and more on a fresh machine), which added three
minutes to the suite. Ranks started by tests inherit it. The compiled kernel is checked against
the eager one, bit for bit, in test_lora_op.py (which turns it back on there), and `make demo`
runs with it.
"""

import os

os.environ.setdefault("MLORA_PP_COMPILE", "0")
