"""A block fbgemm's depthwise kernel cannot compute exactly on 8-bit inputs, for the engine-exactness tests."""

from __future__ import annotations

import torch
from torch import nn


class SaturatingBlock(nn.Module):
    """A pointwise conv with ReLU6 feeding a depthwise conv whose nine weights per channel are all the largest: with
    activations near 6 every pair of fbgemm's 8-bit products is 255 * 127 * 2, twice what 16 bits hold.
    `expand_weight` sets how fast the inputs reach the ReLU6's 6 (0.5 on unit inputs, 0.01 on raw pixels)."""

    def __init__(self, expand_weight: float = 0.5):
        super().__init__()
        self.expand, self.clip = nn.Conv2d(3, 8, 1), nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        with torch.no_grad():
            self.expand.weight.fill_(expand_weight)
            self.expand.bias.fill_(1.0)
            self.depthwise.weight.fill_(0.1)
            self.depthwise.weight[:, :, 0, 0] = -0.1

    def forward(self, x):
        return self.depthwise(self.clip(self.expand(x)))
