"""torch.nn.utils.parametrizations: weight_norm and spectral_norm, and a buffer the model's own
module writes with `out=`. In training mode spectral_norm's power iteration writes its vectors
`_u` and `_v` (buffers) under no_grad with `out=` (`torch.div(..., out=self._u)`), which
torch.export records as `aten.div.out`; Rescale does the same to its `scale` in both modes.

Through export, a buffer's readers and writers must stay in one stage (as for any in-place write
to a buffer), so that each stage alone matches the model. spectral_norm's branch on
self.training makes its parametrization a call the stages keep whole (so they follow eval mode);
Rescale's write is lowered op by op. Under fx the parametrized Linear is one module call.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations


class Rescale(nn.Module):
    """Scales by a running estimate of the activations' size, kept in a buffer written in place."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x):
        with torch.no_grad():
            torch.div(self.scale + x.abs().mean(0), 2.0, out=self.scale)
        return x / self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = parametrizations.weight_norm(nn.Linear(12, 32))
        self.b = parametrizations.spectral_norm(nn.Linear(32, 32))
        self.rescale = Rescale(32)
        self.c = nn.Linear(32, 32)
        self.d = parametrizations.spectral_norm(nn.Linear(32, 32))
        self.e = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = self.rescale(torch.tanh(self.b(x)))
        x = torch.tanh(self.c(x))
        x = torch.tanh(self.d(x))
        # read again after its write, far from it: a later stage gets the written value
        return self.e(x) + self.rescale.scale[:4]


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 12),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
