"""A small ResNet for 3x32x32 images (CIFAR-sized): a conv + BatchNorm + ReLU stem, three
stages of basic residual blocks (conv-bn-relu-conv-bn plus a shortcut) at 16, 32 and 64
channels, global average pooling and a linear classifier.

What it exercises: BatchNorm2d in training mode, whose running_mean / running_var /
num_batches_tracked buffers are updated by every forward (so a stage must carry buffer
updates, not only activations); residual adds, where the shortcut is either the block's input
itself (identity) or a strided 1x1 conv + BatchNorm (downsample) when a stage halves the
resolution and changes the width; and a short skip around every block, so each block's input
is live across two convolutions.

Inputs are float images [B, 3, 32, 32]. The loss is cross-entropy; `target` is what an image
classification data set yields: integer class labels, a LongTensor [B] with values in [0, 10).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_CHANNELS = 3
IMAGE_SIZE = 32
STEM_WIDTH = 16
STAGES = ((16, 1), (32, 2), (64, 2))  # (width, stride of the stage's first block)
BLOCKS_PER_STAGE = 2
CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(IMAGE_CHANNELS, STEM_WIDTH, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_WIDTH),
            nn.ReLU(),
        )
        blocks = []
        channels = STEM_WIDTH
        for width, stride in STAGES:
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model():
    return ResNet()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
