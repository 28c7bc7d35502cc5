"""Values that grow with the batch in two dimensions: `relation` ([B, B], how much each sample
attends to the others in its batch) is made early and read late, so a cut through the body
sends it; the model also returns the CLIP-style in-batch logits ([B, B]) that its loss reads."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class InBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.key = nn.Linear(16, 4)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(8)])
        self.head = nn.Linear(16, 3)
        self.image = nn.Linear(16, 8)
        self.text = nn.Linear(16, 8)

    def forward(self, x):
        keys = self.key(x)
        relation = (keys @ keys.t()).softmax(-1)
        h = relation @ self.body(x)
        logits = F.normalize(self.image(h), dim=-1) @ F.normalize(self.text(x), dim=-1).t()
        return self.head(h), logits


def build_model():
    return InBatch()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def example_targets(batch_size):
    return torch.randint(0, 3, (batch_size,))


def loss_fn(output, target):
    classes, logits = output
    pairs = torch.arange(logits.shape[0], device=logits.device)  # the matching pairs: the diagonal
    return F.cross_entropy(classes, target) + F.cross_entropy(logits, pairs)
