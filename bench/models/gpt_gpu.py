"""The GPT example (examples/gpt.py) at a GPU-sized shape, without dropout: 12 blocks of width
1024 over 256 tokens. Without dropout, pipeline training equals the plain training loop
exactly, which is what bench/gpu_check.py compares.

It reuses the example's classes, which read their sizes from module constants when built.
"""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ftc_bench_gpt", Path(__file__).resolve().parents[2] / "examples" / "gpt.py")
gpt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpt
_spec.loader.exec_module(gpt)
gpt.WIDTH, gpt.HEADS, gpt.LAYERS, gpt.CONTEXT, gpt.DROPOUT = 1024, 16, 12, 256, 0.0

build_model = gpt.build_model
example_inputs = gpt.example_inputs
loss_fn = gpt.loss_fn
