"""A two-tower retrieval model: a query tower over token ids and an item tower over dense
features, each followed by the SAME projection head, scored by a scaled cosine similarity.

What it exercises:
- keyword inputs: example_inputs returns a dict {"query": ..., "item": ...} and forward takes
  `query` and `item` by name;
- a dict output {"score", "query_embedding", "item_embedding"};
- one submodule called at two places: `self.project` maps both towers into the shared space,
  so its weights get gradient from two uses that may sit in different stages;
- in-place ops on activations: F.relu(..., inplace=True) in the query tower,
  nn.ReLU(inplace=True) and `mul_` in the item tower;
- bare nn.Parameters read directly in forward: a learned logit scale (log temperature) and a
  score bias;
- constants made in forward: a 0-dim tensor `torch.tensor(MAX_LOGIT_SCALE)` that clamps the
  learned scale (as CLIP does), plus Python float constants; and a padding mask computed from
  the integer input.

Inputs: "query", token ids, a LongTensor [B, 16] in [0, 1000) where id 0 is padding (ignored by
the mean pooling); "item", float features [B, 32]. The loss is binary cross-entropy on
output["score"]; `target` is what a click log yields: one label per (query, item) pair, a float
tensor [B] of 1.0 (clicked) and 0.0 (not clicked).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 1000
PAD = 0
QUERY_LENGTH = 16
ITEM_FEATURES = 32
EMBED = 32
HIDDEN = 64
OUT = 32
INITIAL_LOGIT_SCALE = 10.0
MAX_LOGIT_SCALE = 100.0


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        # Query tower: embedding bag (masked mean) + MLP.
        self.embed = nn.Embedding(VOCAB, EMBED, padding_idx=PAD)
        self.query_fc = nn.Linear(EMBED, HIDDEN)
        # Item tower: MLP over dense features.
        self.item_fc1 = nn.Linear(ITEM_FEATURES, HIDDEN)
        self.item_act = nn.ReLU(inplace=True)
        self.item_fc2 = nn.Linear(HIDDEN, HIDDEN)
        # Shared by both towers.
        self.project = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))
        # Bare parameters, read directly in forward.
        self.logit_scale = nn.Parameter(torch.full((), math.log(INITIAL_LOGIT_SCALE)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, query, item):
        mask = (query != PAD).unsqueeze(-1).to(torch.float32)
        tokens = self.embed(query) * mask
        pooled = tokens.sum(1) / mask.sum(1).clamp(min=1.0)
        q = F.relu(self.query_fc(pooled), inplace=True)

        i = self.item_act(self.item_fc1(item))
        i = self.item_fc2(i)
        i.mul_(0.5)  # in place on an activation (addmm does not save its output)

        query_embedding = F.normalize(self.project(q), dim=-1)
        item_embedding = F.normalize(self.project(i), dim=-1)
        scale = torch.minimum(self.logit_scale.exp(), torch.tensor(MAX_LOGIT_SCALE))
        score = scale * (query_embedding * item_embedding).sum(-1) + self.bias
        return {"score": score, "query_embedding": query_embedding, "item_embedding": item_embedding}


def build_model():
    return TwoTower()


def example_inputs(batch_size):
    return {
        "query": torch.randint(0, VOCAB, (batch_size, QUERY_LENGTH)),
        "item": torch.randn(batch_size, ITEM_FEATURES),
    }


def example_targets(batch_size):
    """Click labels for a batch, as a click log gives them (the synthetic data set uses this)."""
    return torch.randint(0, 2, (batch_size,)).float()


def loss_fn(output, target):
    return F.binary_cross_entropy_with_logits(output["score"], target)
