"""Less common torch.nn layers and ops, which export records as ATen ops without the layer's
signature: Unfold/Fold (im2col/col2im), view_as, ChannelShuffle, PReLU, Mish/Hardswish/CELU/ReLU6,
RMSNorm, reflection and zero padding, AdaptiveAvgPool1d, grid_sample over an affine grid, and a graph network's
message passing (gather, scatter_add, index_add_ over a batched edge list [B, 2, E]).

Through --frontend export every one of them must read as torch code: a module call where the
layer ran as one op, else an F.* call or a tensor method, never `torch.ops.aten...`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NODES, EDGES = 8, 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.c1 = nn.Conv2d(4, 8, 3)
        self.shuffle = nn.ChannelShuffle(2)
        self.prelu = nn.PReLU(8)
        self.unfold = nn.Unfold(kernel_size=2, stride=2)
        self.fold = nn.Fold(output_size=(8, 8), kernel_size=2, stride=2)
        self.mix = nn.Linear(32, 32)
        self.zpad = nn.ZeroPad2d((1, 0, 1, 0))
        self.c2 = nn.Conv2d(8, 8, 2)
        self.rms = nn.RMSNorm(8)
        self.mish, self.hardswish, self.celu, self.relu6 = nn.Mish(), nn.Hardswish(), nn.CELU(0.5), nn.ReLU6()
        self.message = nn.Linear(16, 8)
        self.pool1d = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x, edges):
        h = self.prelu(self.shuffle(self.c1(self.pad(x))))
        cols = self.mix(self.unfold(h).transpose(1, 2)).transpose(1, 2)
        h = self.mish(self.fold(cols)).view_as(h)
        theta = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.9, 0.0]], device=x.device).expand(x.shape[0], 2, 3)
        h = F.grid_sample(h, F.affine_grid(theta, list(h.shape), align_corners=False), align_corners=False)
        h = self.hardswish(self.c2(self.zpad(h)))  # [B, 8, 8, 8]
        nodes = self.celu(self.rms(h.flatten(2).transpose(1, 2)))  # [B, 64 positions, 8]: the first 8 are nodes
        nodes = nodes[:, :NODES]
        src, dst = edges[:, 0], edges[:, 1]  # [B, E] each
        width = nodes.shape[-1]
        pairs = torch.cat([torch.gather(nodes, 1, src.unsqueeze(-1).expand(-1, -1, width)),
                           torch.gather(nodes, 1, dst.unsqueeze(-1).expand(-1, -1, width))], -1)
        messages = self.relu6(self.message(pairs))
        summed = torch.zeros_like(nodes).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, width), messages)
        degree = torch.zeros(nodes.shape[0], NODES, dtype=nodes.dtype, device=nodes.device)
        degree.index_add_(1, dst[0], torch.ones(dst.shape[1], dtype=nodes.dtype, device=nodes.device).expand(nodes.shape[0], -1))
        nodes = nodes + summed / degree.clamp(min=1).unsqueeze(-1)
        return self.head(self.pool1d(nodes.transpose(1, 2)).squeeze(-1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return torch.randn(batch_size, 4, 8, 8), torch.randint(0, NODES, (batch_size, 2, EDGES))


def loss_fn(output, target):
    return F.cross_entropy(output, target)
