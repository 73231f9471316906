"""README "Writing a compute package": its snippets are one package; every one of them runs.

The code blocks that start with a comment naming a file are written to a folder; the
package is built, its callbacks are run through the EdgeClient API as a client runs them,
it is packed (honouring its .scaleoutignore), and the README's `scaleout dev` line is run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


SECTION = section("Writing a compute package")
BLOCKS = re.findall(r"^```[a-z]*\n(.*?)^```", SECTION, re.M | re.S)


def files() -> dict[str, str]:
    out = {}
    for block in BLOCKS:
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w.]+", first):
            out[first[2:]] = block
    return out


def write_package(folder: Path) -> Path:
    pkg = folder / "my-package"
    pkg.mkdir()
    for name, text in files().items():
        (pkg / name).write_text(text)
    return pkg


def site_data(folder: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    folder.mkdir()
    np.savez(folder / "data.npz", x=x, y=y)
    return folder


def scaleout(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scaleout", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_the_section_is_a_whole_package() -> None:
    assert set(files()) == {"scaleout.yaml", "build.py", "startup.py", ".scaleoutignore"}
    # Every block is either a file of the package or the command that runs it.
    others = [b for b in BLOCKS if b.splitlines()[0][2:] not in files()]
    assert len(others) == 1 and others[0].startswith("SITE_DATA="), others


def test_the_callbacks_do_what_the_section_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scaleout import EdgeClient
    from scaleout.package.archive import create_archive
    from scaleout.package.seed import read_model_file

    pkg = write_package(tmp_path)
    r = scaleout("run", "build", "-p", str(pkg), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seed = read_model_file(tmp_path / "out" / "seed.npz")

    monkeypatch.setenv("SITE_DATA", str(site_data(tmp_path / "site")))
    monkeypatch.chdir(pkg)  # where a client runs a package's code
    spec = importlib.util.spec_from_file_location("readme_startup", pkg / "startup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = EdgeClient(name="site-1")
    metrics: list[tuple[dict[str, float], int | None]] = []
    logs: list[tuple[str, dict[str, object]]] = []
    client._metric_sink = lambda values, step: metrics.append((values, step))  # what the client role sends on
    client._log_sink = lambda kind, data: logs.append((kind, data))
    module.startup(client)
    assert client.registered() == ["train", "validate", "predict", "custom:data_summary"]
    assert ("attributes", {"site": "site-1", "rows": 64}) in logs

    model, metadata = client.run_train(seed, {"epochs": 5, "learning_rate": 0.1})
    assert metadata == {"training_metadata": {"num_examples": 64}}
    assert [step for _, step in metrics] == [0, 1, 2, 3, 4]
    assert metrics[-1][0]["train_mse"] < metrics[0][0]["train_mse"]  # it learns
    assert [kind for kind, _ in logs].count("telemetry") == 1
    before, after = client.run_validate(seed), client.run_validate(model)
    assert set(after) == {"validation_mse"} and after["validation_mse"] < before["validation_mse"]
    assert len(client.run_predict(model, {"n": 2})["predictions"]) == 2
    assert client.run_custom("data_summary", {})["rows"] == 64

    # package create leaves out what .scaleoutignore names.
    (pkg / "data").mkdir()
    (pkg / "data" / "big.bin").write_bytes(b"x" * 100)
    (pkg / "run.log").write_text("log")
    with tarfile.open(create_archive(pkg, tmp_path / "pkg.tgz")) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"startup.py", "build.py", "scaleout.yaml"} <= names and not {"big.bin", "run.log"} & names, names


def test_the_dev_line_runs(tmp_path: Path) -> None:
    (line,) = [b.strip() for b in BLOCKS if b.startswith("SITE_DATA=")]
    words = shlex.split(line)
    assign, command = words[0], words[1:]
    assert command[0] == "scaleout" and assign.startswith("SITE_DATA=")
    write_package(tmp_path)
    data = site_data(tmp_path / "site-data")
    report = tmp_path / "report.json"
    r = scaleout(*command[1:], "--report", str(report), cwd=tmp_path, env={"SITE_DATA": str(data)}, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert [x["status"] for x in result["rounds"]] == ["succeeded", "succeeded"], result
    assert all(x["participants"] == 2 and "validation_mse" in x["validation"] for x in result["rounds"]), result
    first, last = (x["validation"]["validation_mse"] for x in (result["rounds"][0], result["rounds"][-1]))
    assert last < first, result
