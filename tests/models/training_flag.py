"""`self.training` passed to a function (`F.dropout(h, p, self.training)`), in the root and in a
traced submodule: the stages must follow their own train()/eval() mode, as the model does, not
the mode the model was traced in.

Inputs are float [B, 16]; output [B, 16]. Loss: MSE against a float target [B, 16].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return F.dropout(torch.tanh(self.fc(x)), 0.25, self.training)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = F.dropout(block(x), p=0.1, training=self.training)
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
