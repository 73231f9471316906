"""Write seed.npz: the initial DigitsNet, every state_dict entry under its name."""

import os

import torch
from model import DigitsNet

from scaleoututil.helpers.helpers import get_helper


def build():
    torch.manual_seed(0)
    net = DigitsNet()
    out = os.environ.get("SCALEOUT_BUILD_OUTPUT_DIR", ".")
    path = get_helper("numpyhelper").save({k: v.numpy() for k, v in net.state_dict().items()}, os.path.join(out, "seed.npz"))
    print(f"Created {path} ({sum(v.numel() for v in net.state_dict().values())} values).")


if __name__ == "__main__":
    build()
