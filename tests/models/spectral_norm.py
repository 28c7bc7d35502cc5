"""torch.nn.utils.parametrizations: weight_norm and spectral_norm. In training mode
spectral_norm's power iteration writes its vectors `_u` and `_v` (buffers) under no_grad with
`out=` (`torch.div(..., out=self._u)`), which torch.export records as `aten.div.out`.

Through export, the buffers' readers and writers must stay in one stage (as for any in-place
write to a buffer), so that each stage alone matches the model. Under fx the parametrized
Linear is one module call.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = parametrizations.weight_norm(nn.Linear(12, 32))
        self.b = parametrizations.spectral_norm(nn.Linear(32, 32))
        self.c = nn.Linear(32, 32)
        self.d = parametrizations.spectral_norm(nn.Linear(32, 32))
        self.e = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = torch.tanh(self.b(x))
        x = torch.tanh(self.c(x))
        x = torch.tanh(self.d(x))
        return self.e(x)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 12),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
