"""A library block that rescales a weight in place when its mode changes, as transformers' RWKV
does (`_rescale_layers`, for float16 inference): eval() halves the output weight and doubles the
output to match, train() doubles the weight back, and a Python flag says which it holds."""

import torch
import torch.nn as nn


class RescaledBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.output = nn.Linear(width, width)
        self.rescaled = False

    def forward(self, x):
        if self.training == self.rescaled:
            with torch.no_grad():
                if self.training:
                    self.output.weight.mul_(2)
                else:
                    self.output.weight.div_(2)
            self.rescaled = not self.training
        h = self.output(torch.tanh(self.inner(x)))
        return x + (h * 2 if self.rescaled else h)
