"""Write seed.npz: the initial weights of a 20 -> 16 -> 3 MLP (tanh hidden layer)."""

import os

import numpy as np

from scaleoututil.helpers.helpers import get_helper

helper = get_helper("numpyhelper")

# Must match startup.py.
N_FEATURES, N_HIDDEN, N_CLASSES = 20, 16, 3


def build():
    rng = np.random.default_rng(42)
    params = [
        (rng.standard_normal((N_FEATURES, N_HIDDEN)) / np.sqrt(N_FEATURES)).astype(np.float32),
        np.zeros(N_HIDDEN, dtype=np.float32),
        (rng.standard_normal((N_HIDDEN, N_CLASSES)) * 0.01).astype(np.float32),
        np.zeros(N_CLASSES, dtype=np.float32),
    ]
    output_dir = os.environ.get("SCALEOUT_BUILD_OUTPUT_DIR", ".")
    path = helper.save(params, os.path.join(output_dir, "seed.npz"))
    print(f"Created {path} ({sum(p.size for p in params)} parameters).")


if __name__ == "__main__":
    build()
