"""A GPT-style decoder: token and position embeddings, pre-norm transformer blocks with causal
self-attention, and an LM head tied to the token embedding (F.linear with the embedding's
weight), so that the largest tensor of the model is read at both ends of the pipeline.

Inputs are byte-level token ids; the loss is next-token cross-entropy.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256
CONTEXT = 64
WIDTH = 128
HEADS = 4
LAYERS = 8
DROPOUT = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(DROPOUT)
        mask = torch.tril(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, CONTEXT, CONTEXT), persistent=False)

    def forward(self, x):
        batch, time, width = x.size()
        q, k, v = self.qkv(x).split(WIDTH, dim=2)
        q = q.view(batch, time, HEADS, width // HEADS).transpose(1, 2)
        k = k.view(batch, time, HEADS, width // HEADS).transpose(1, 2)
        v = v.view(batch, time, HEADS, width // HEADS).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / (width // HEADS) ** 0.5)
        scores = scores.masked_fill(~self.mask[:, :, :time, :time], float("-inf"))
        attention = self.dropout(F.softmax(scores, dim=-1))
        y = (attention @ v).transpose(1, 2).contiguous().view(batch, time, width)
        return self.dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.proj = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Parameter(torch.zeros(1, CONTEXT, WIDTH))
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(WIDTH)
        # GPT-2's initialization: nn.Embedding's default N(0, 1) would, through the tied head,
        # give logits of standard deviation sqrt(WIDTH) and a first loss near 80, not ln(VOCAB).
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe, std=0.02)

    def forward(self, idx):
        time = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe[:, :time])
        for block in self.blocks:
            x = block(x)
        # The LM head shares the token embedding's weight.
        return F.linear(self.ln_f(x), self.wte.weight)


def build_model():
    return GPT()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, CONTEXT)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))
