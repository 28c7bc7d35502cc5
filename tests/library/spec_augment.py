"""A stand-in for a library encoder (transformers' Wav2Vec2Model) that masks time steps when
training, drawing the mask with numpy at the batch's size (SpecAugment), so torch.export fixes the
batch size in training mode only."""

import numpy as np
import torch
import torch.nn as nn


class MaskedEncoder(nn.Module):
    def __init__(self, width: int, mask_prob: float):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.mask_embed = nn.Parameter(torch.zeros(width))
        self.mask_prob = mask_prob

    def forward(self, x):
        h = self.proj(x)
        if self.training and self.mask_prob > 0:
            masked = torch.from_numpy(np.random.rand(x.shape[0], x.shape[1]) < self.mask_prob)
            h = torch.where(masked[..., None], self.mask_embed, h)
        return h
