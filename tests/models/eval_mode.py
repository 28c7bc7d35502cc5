"""Layers that compute differently in eval mode, whose ATen ops through torch.export carry the
training mode as an argument: a 2-layer GRU with dropout between its layers (`train`) and an
InstanceNorm with running statistics (`use_input_stats`). The trace runs in training mode; the
stages must follow their own train()/eval() as the layers do (both become calls of the layers).

Inputs: token ids, a LongTensor [B, 6] in [0, 20); the output is [B, 6, 4]. Loss: MSE.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 12, num_layers=2, dropout=0.3, batch_first=True)
        self.norm = nn.InstanceNorm1d(6, affine=True, track_running_stats=True)
        self.head = nn.Linear(12, 4)

    def forward(self, ids):
        states, _ = self.rnn(self.embed(ids))
        return self.head(torch.relu(self.norm(states)))


def build_model():
    return Tagger()


def example_inputs(batch_size):
    return (torch.randint(0, 20, (batch_size, 6)),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
