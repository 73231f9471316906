"""PyTorch on scikit-learn's digits (1,797 8x8 images, shipped with scikit-learn: no download).

Each client trains on its own share of the training images, drawn from a seed derived from
its name; all clients test on the same held-out images and print their accuracy each round.
"""

import zlib

import numpy as np
import torch
from model import from_scaleout, to_scaleout
from torch import nn

from scaleout import EdgeClient, ScaleoutModel

torch.set_num_threads(1)  # several clients share a machine's cores in a local federation
DEFAULTS = {"epochs": 1, "learning_rate": 0.05, "batch_size": 32, "share": 0.5}


def load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def startup(client: EdgeClient):
    DigitsClient(client)


class DigitsClient:
    def __init__(self, client: EdgeClient):
        self.client = client
        self._data = None
        self.rounds = 0
        client.set_train_callback(self.train)
        client.set_validate_callback(self.validate)

    @property
    def data(self):
        if self._data is None:  # on first use: the runtime may set client.name after startup()
            x, y, x_test, y_test = load_digits()
            rng = np.random.default_rng(zlib.crc32(self.client.name.encode()))
            mine = rng.permutation(len(y))[: int(len(y) * DEFAULTS["share"])]
            self._data = (x[mine], y[mine], x_test, y_test)
        return self._data

    def train(self, model: ScaleoutModel, settings):
        net = from_scaleout(model)
        x, y, _, _ = self.data
        epochs = int(settings.get("epochs", DEFAULTS["epochs"]))
        lr = float(settings.get("learning_rate", DEFAULTS["learning_rate"]))
        batch_size = int(settings.get("batch_size", DEFAULTS["batch_size"]))
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(zlib.crc32(self.client.name.encode()) + self.rounds)
        self.rounds += 1
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), batch_size):
                batch = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(net(x[batch]), y[batch])
                loss.backward()
                opt.step()
                total += float(loss) * len(batch)
            self.client.log_metric({"train_loss": total / len(y)}, step=epoch)
            self.client.check_task_abort()
        return to_scaleout(net), {"training_metadata": {"num_examples": len(y), "epochs": epochs}}

    def validate(self, model: ScaleoutModel):
        net = from_scaleout(model)
        net.eval()
        x, y, x_test, y_test = self.data
        with torch.no_grad():
            train_acc = float((net(x).argmax(1) == y).float().mean())
            test_out = net(x_test)
            test_loss = float(nn.functional.cross_entropy(test_out, y_test))
            test_acc = float((test_out.argmax(1) == y_test).float().mean())
        print(f"{self.client.name}: test accuracy {test_acc:.3f} (train {train_acc:.3f})", flush=True)
        return {"training_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc}
