"""Operators of the model's own (torch.library.custom_op): one with a fake kernel for tracing and
its own backward, called at two places, one on each side of a stage cut; one that returns
nothing and counts the samples seen into a buffer (its schema declares the write); and one
defined the older way, a torch.library.Library of its own, which torch lets a process define
once (a second import of this file would fail)."""

import torch
import torch.nn as nn


@torch.library.custom_op("ftc_tests::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _save(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return grad * ctx.scale * (1 - (y / ctx.scale) ** 2), None


scaled_tanh.register_autograd(_backward, setup_context=_save)


@torch.library.custom_op("ftc_tests::count_samples", mutates_args=("counter",))
def count_samples(counter: torch.Tensor, x: torch.Tensor) -> None:
    counter.add_(x.shape[0])


_library = torch.library.Library("ftc_tests_lib", "DEF")
_library.define("halve(Tensor x) -> Tensor")
_library.impl("halve", lambda x: x / 2, "CompositeImplicitAutograd")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        count_samples(self.seen, x)
        x = scaled_tanh(self.fc1(x), 2.0)
        x = scaled_tanh(self.fc2(x), 0.5)
        return self.fc3(torch.ops.ftc_tests_lib.halve(x))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target)
