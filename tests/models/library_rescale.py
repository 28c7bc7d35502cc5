"""A model of a library's blocks (tests/library/rescaled_blocks.py) that rescale a weight in place
when their mode changes and keep a Python flag of it, as transformers' RWKV does. Training mode
never rescales; ftc's own eval-mode run of forward (to find the library's branches on
`self.training`) left the flag set, and the trace then recorded the weight's doubling into the
stage code, which doubled it at every call.

Inputs are float [B, 16]; output [B, 4]. Loss: cross-entropy against a class id [B] in [0, 4).
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LIBRARY = str(Path(__file__).resolve().parents[1] / "library")
if LIBRARY not in sys.path:
    sys.path.append(LIBRARY)

from rescaled_blocks import RescaledBlock

WIDTH = 16


def build_model():
    return nn.Sequential(RescaledBlock(WIDTH), RescaledBlock(WIDTH), nn.Linear(WIDTH, 4))


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
