"""Quickstart: a numpy MLP classifier trained on each client's private synthetic shard.

Every client sees the same three Gaussian classes in 20 dimensions (fixed global seed),
but draws its own samples, with a slightly different class balance, from a seed derived
from its name.
"""

import zlib

import numpy as np

from scaleout import EdgeClient, ScaleoutModel
from scaleoututil.helpers.helpers import get_helper

helper = get_helper("numpyhelper")

N_FEATURES, N_CLASSES = 20, 3  # must match build.py
N_TRAIN, N_TEST = 600, 300
CLASS_SEED = 1234  # shared by every client: same classes everywhere
CLASS_SPREAD = 0.5  # distance of class means; lower -> more overlap, harder task

DEFAULTS = {"epochs": 1, "learning_rate": 0.05, "batch_size": 32}


def startup(client: EdgeClient):
    QuickstartClient(client)


def make_shard(name):
    """(x_train, y_train, x_test, y_test) for the client called `name`."""
    means = np.random.default_rng(CLASS_SEED).standard_normal((N_CLASSES, N_FEATURES)) * CLASS_SPREAD
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    balance = 1.0 + 0.6 * rng.random(N_CLASSES)
    balance /= balance.sum()

    def draw(n):
        y = rng.choice(N_CLASSES, size=n, p=balance)
        x = means[y] + rng.standard_normal((n, N_FEATURES))
        return x.astype(np.float32), y

    return (*draw(N_TRAIN), *draw(N_TEST))


def forward(params, x):
    w1, b1, w2, b2 = params
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def evaluate(params, x, y):
    """(mean cross-entropy loss, accuracy)."""
    _, probs = forward(params, x)
    loss = -np.log(probs[np.arange(len(y)), y] + 1e-12).mean()
    return float(loss), float((probs.argmax(axis=1) == y).mean())


def sgd_step(params, x, y, lr, anchor=None, mu=0.0):
    """One SGD step on the cross-entropy; with ``anchor`` (the round's global model) and
    ``mu`` > 0, on FedProx's local objective: loss + (mu / 2) ||params - anchor||^2."""
    w1, b1, w2, b2 = params
    hidden, probs = forward(params, x)
    grad_logits = probs
    grad_logits[np.arange(len(y)), y] -= 1.0
    grad_logits /= len(y)
    grad_hidden = (grad_logits @ w2.T) * (1.0 - hidden**2)
    grads = [x.T @ grad_hidden, grad_hidden.sum(axis=0), hidden.T @ grad_logits, grad_logits.sum(axis=0)]
    if anchor is not None and mu > 0:  # the proximal term's gradient pulls towards the global model
        grads = [g + mu * (p - a) for g, p, a in zip(grads, params, anchor)]
    return [(p - lr * g).astype(p.dtype) for p, g in zip(params, grads)]


class QuickstartClient:
    def __init__(self, client: EdgeClient):
        self.client = client
        self._data = None
        self._calls = 0  # varies the shuffling between rounds, reproducibly
        client.set_train_callback(self.train)
        client.set_validate_callback(self.validate)
        client.set_predict_callback(self.predict)  # scaleout predict run
        client.set_custom_callback("data_summary", self.data_summary)  # scaleout command run data_summary

    @property
    def data(self):
        # Built on first use: the runtime may set client.name after startup().
        if self._data is None:
            self._data = make_shard(self.client.name)
        return self._data

    def train(self, model: ScaleoutModel, settings):
        params = model.get_model_params(helper)
        epochs = int(settings.get("epochs", DEFAULTS["epochs"]))
        lr = float(settings.get("learning_rate", DEFAULTS["learning_rate"]))
        batch_size = int(settings.get("batch_size", DEFAULTS["batch_size"]))
        # FedProx (--aggregator fedprox) hands every client its mu: keep near the global model.
        mu = float(settings.get("mu", 0.0))
        anchor = [p.copy() for p in params] if mu > 0 else None
        x, y = self.data[0], self.data[1]
        self._calls += 1
        rng = np.random.default_rng([zlib.crc32(self.client.name.encode()), self._calls])
        for epoch in range(epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), batch_size):
                batch = order[start : start + batch_size]
                params = sgd_step(params, x[batch], y[batch], lr, anchor, mu)
            loss, _ = evaluate(params, x, y)
            self.client.log_metric({"train_loss": loss}, step=epoch)
            self.client.check_task_abort()
        metadata = {"training_metadata": {"num_examples": len(y), "epochs": epochs, "batch_size": batch_size}}
        if anchor is not None:
            metadata["training_metadata"]["mu"] = mu
        return ScaleoutModel.from_model_params(params, helper), metadata

    def validate(self, model: ScaleoutModel):
        params = model.get_model_params(helper)
        x_train, y_train, x_test, y_test = self.data
        train_loss, train_acc = evaluate(params, x_train, y_train)
        test_loss, test_acc = evaluate(params, x_test, y_test)
        return {
            "training_loss": train_loss,
            "training_accuracy": train_acc,
            "validation_loss": test_loss,
            "validation_accuracy": test_acc,
        }

    def predict(self, model: ScaleoutModel, params):
        """Classify this client's test samples (the first ``params["n"]``, default all):
        how many of each class the model predicts, and its accuracy on them."""
        params_ = model.get_model_params(helper)
        x, y = self.data[2], self.data[3]
        n = min(int(params.get("n", len(y))), len(y))
        _, probs = forward(params_, x[:n])
        predicted = probs.argmax(axis=1)
        return {"n": n, "accuracy": float((predicted == y[:n]).mean()), "predicted": np.bincount(predicted, minlength=N_CLASSES).tolist()}

    def data_summary(self, params):
        """What this client's private shard looks like, without any sample leaving it."""
        y_train, y_test = self.data[1], self.data[3]
        return {"train": len(y_train), "test": len(y_test), "classes": np.bincount(y_train, minlength=N_CLASSES).tolist()}
