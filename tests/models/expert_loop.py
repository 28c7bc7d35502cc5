"""A top-1 mixture of experts that loops over the experts a batch hits, as transformers' Switch
Transformers and NLLB-MoE experts do (`for expert_idx in expert_hit:`, expert_hit from
nonzero()): how many times the loop runs depends on values, which no trace can fix. LAYERDROP
above 0 skips a block at random while training, as NLLB-MoE's encoder_layerdrop does.

Inputs are float [B, 8, 16]; output [B, 8, 16]. Loss: MSE against a float target [B, 8, 16].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 16
EXPERTS = 4
LAYERDROP = 0.0


class Experts(nn.ModuleList):
    def forward(self, hidden, chosen, weights):
        out = torch.zeros_like(hidden)
        hit = torch.greater(chosen.sum(0), 0).nonzero()
        for expert_index in hit:
            tokens = chosen[:, expert_index[0]].nonzero().squeeze(-1)
            out.index_add_(0, tokens, self[expert_index[0]](hidden[tokens]) * weights[tokens])
        return out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(WIDTH, EXPERTS)
        self.experts = Experts([nn.Linear(WIDTH, WIDTH) for _ in range(EXPERTS)])

    def forward(self, x):
        hidden = x.reshape(-1, WIDTH)
        probs = F.softmax(self.router(hidden), dim=-1)
        chosen = F.one_hot(probs.argmax(-1), EXPERTS)
        weights = probs.max(-1, keepdim=True).values
        return x + self.experts(hidden, chosen, weights).reshape(x.shape)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.layerdrop = LAYERDROP

    def forward(self, x):
        for block in self.blocks:
            if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:
                continue
            x = block(x)
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
