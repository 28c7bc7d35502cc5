"""A small language model for the memory audit (tests/test_memory_truth.py): a tied embedding
and LM head over a vocabulary large enough that the logits and what the loss saves (its
log_softmax, as large again) dominate the last stage; its first two blocks frozen (no
gradients, no optimizer state); BatchNorm buffers in every block."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH, BLOCKS, TOKENS = 8192, 64, 4, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(TOKENS)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(BLOCKS)])
        for block in self.blocks[:2]:
            block.requires_grad_(False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model():
    return LanguageModel()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, TOKENS)),)


def loss_fn(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())
