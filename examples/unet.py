"""A small U-Net for 1x32x32 images: three encoder levels (two 3x3 convs each, then 2x2 max
pooling), a bottleneck at 4x4, and three decoder levels that upsample with ConvTranspose2d and
concatenate (torch.cat) the encoder features of the same resolution before their two convs; a
1x1 conv gives one logit per pixel.

What it exercises: long skip connections. The first encoder level's features are made at the
very start of the network and consumed by the last decoder level, so in a pipeline they must
travel past every stage in between; the three skips are nested, so a cut through the middle of
the network carries up to three of them at once, at different resolutions.

Inputs are float images [B, 1, 32, 32]. The loss is per-pixel binary cross-entropy on the
logits; `target` is what a segmentation data set yields: a mask of the same shape as the output,
a float tensor [B, 1, 32, 32] of 0.0 (background) and 1.0 (foreground).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN_CHANNELS = 1
OUT_CHANNELS = 1
IMAGE_SIZE = 32
WIDTHS = (8, 16, 32)  # encoder levels, top to bottom
BOTTLENECK = 64


class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList()
        channels = IN_CHANNELS
        for width in WIDTHS:
            self.encoders.append(DoubleConv(channels, width))
            channels = width
        self.bottleneck = DoubleConv(channels, BOTTLENECK)
        channels = BOTTLENECK
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(WIDTHS):
            self.upsamplers.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            # The decoder sees the upsampled features and the encoder's skip, concatenated.
            self.decoders.append(DoubleConv(2 * width, width))
            channels = width
        self.head = nn.Conv2d(channels, OUT_CHANNELS, 1)

    def forward(self, x):
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def build_model():
    return UNet()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE),)


def loss_fn(output, target):
    return F.binary_cross_entropy_with_logits(output, target)
