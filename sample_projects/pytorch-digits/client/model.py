"""A small CNN for 8x8 digit images, and its state_dict <-> ScaleoutModel round trip."""

import numpy as np
import torch
from torch import nn

from scaleout import ScaleoutModel


class DigitsNet(nn.Module):
    """conv(1->8) + BatchNorm + ReLU + 2x2 pool, then a linear layer to 10 classes.

    BatchNorm keeps running statistics and an integer counter (num_batches_tracked): buffers
    that travel and are averaged with the weights.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def to_scaleout(net: nn.Module) -> ScaleoutModel:
    """Every entry of the state_dict (weights and buffers), by name, in its order."""
    return ScaleoutModel.from_model_params({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})


def from_scaleout(model: ScaleoutModel) -> DigitsNet:
    params = model.get_model_params()
    net = DigitsNet()
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()}
    net.load_state_dict(state, strict=True)
    return net
