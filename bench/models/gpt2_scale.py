"""The GPT example (examples/gpt.py) at GPT-2 XL's shape: width 1600, 25 heads, a 50257-token
vocabulary, 1024 positions; the number of blocks comes from the environment variable
FTC_BENCH_LAYERS (48, GPT-2 XL's 1.5B parameters, when unset). bench/compile_scale.py compiles
it on the meta device only: building it for real would allocate the weights.

It reuses the example's classes, which read their sizes from module constants when built.
"""

import importlib.util
import os
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "ftc_bench_gpt2", Path(__file__).resolve().parents[2] / "examples" / "gpt.py"
)
gpt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpt
_spec.loader.exec_module(gpt)
gpt.VOCAB, gpt.WIDTH, gpt.HEADS, gpt.CONTEXT = 50257, 1600, 25, 1024
gpt.LAYERS = int(os.environ.get("FTC_BENCH_LAYERS", "48"))

build_model = gpt.build_model
example_inputs = gpt.example_inputs
loss_fn = gpt.loss_fn
