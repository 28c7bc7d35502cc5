"""A MoCo-style queue of keys that forward rolls by tensor ops: the newest keys go in front of the
queue's first QUEUE - B rows (`self.queue[:-B]`), so that slice is [QUEUE - B, WIDTH], a size
that changes with the batch size but not in proportion to it. No micro-batch size tells it, so
a stage cannot receive it: it must stay with the op that reads it. torch.export bounds the batch
by the queue (B <= QUEUE), which a named batch Dim refuses.

Input: float features [B, 8]; output: logits [B, QUEUE] against the keys. Loss: cross-entropy
with the positive key at index 0 of each row's own sample (class indices [B]).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

QUEUE = 32
WIDTH = 8


class QueueSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(QUEUE, WIDTH), dim=1))
        self.embed = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
        self.key = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
        self.query = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        older = self.queue[: -x.shape[0]]
        h = self.embed(x) + older.mean(0)
        keys = torch.cat([F.normalize(self.key(h), dim=1), older])
        return self.query(h) @ keys.t()


def build_model():
    return QueueSlice()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
