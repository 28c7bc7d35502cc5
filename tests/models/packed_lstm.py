"""An LSTM over right-padded sequences of different lengths, packed with pack_padded_sequence
inside a LEAF_MODULES class (the packing reads the lengths' values, which neither tracer can
follow): the meta device cannot run it, so ftc runs it on the CPU on stand-in inputs, where
lengths of 0, which pack_padded_sequence refuses, must not stop the compile.

Inputs: "ids" [B, 9] in [0, 30) and "lengths" [B] in [3, 10). Output: class logits [B, 3].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, h[-1]


LEAF_MODULES = (PackedLSTM,)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.rnn = PackedLSTM()
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids, lengths):
        out, last = self.rnn(self.embed(ids), lengths)
        return self.head(torch.tanh(self.mid(last + out.mean(1))))


def build_model():
    return Model()


def example_inputs(batch_size):
    return (torch.randint(0, 30, (batch_size, 9)), torch.randint(3, 10, (batch_size,)))


def loss_fn(output, target):
    return F.cross_entropy(output, target)
