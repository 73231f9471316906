"""sample_projects/quickstart/notebook.ipynb, executed headless as a user would run it: it
starts its own federation (controller, combiner, two clients), trains, plots and downloads
the final model (issue 16 #2)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "sample_projects" / "quickstart" / "notebook.ipynb"


def processes_under(folder: Path) -> list[int]:
    """Pids of the processes whose command line names ``folder`` (what the notebook started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline:
                pids.append(int(entry.name))
    return pids


def test_the_quickstart_notebook_runs_headless_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient  # the dev extra's (make test installs it)
    import nbformat
    for name in ("SCALEOUT_CONTROLLER", "SCALEOUT_TOKEN", "SCALEOUT_CA"):
        monkeypatch.delenv(name, raising=False)  # its own federation, not one of the environment's
    work = tmp_path / "work"
    model = tmp_path / "final.npz"
    monkeypatch.setenv("QUICKSTART_WORK", str(work))
    monkeypatch.setenv("QUICKSTART_MODEL", str(model))
    monkeypatch.setenv("QUICKSTART_ROUNDS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    try:
        nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        left = processes_under(work)
        for pid in left:  # a failed cell leaves its federation up: stopped here, and the test fails below
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"the notebook left {len(left)} processes running"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    plot = next(cell for cell in code if "plt.show()" in cell.source)
    images = [out for out in plot.outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) == 1, plot.outputs
    counted = "".join(out.get("text", "") for out in plot.outputs if out.output_type == "stream")
    assert "4 validations from 2 clients" in counted, plot.outputs  # one record per client and round, 2 rounds
    session = next(cell for cell in code if "wait_for_session" in cell.source)
    printed = "".join(out.get("text", "") for out in session.outputs if out.output_type == "stream")
    assert "round 1: succeeded, 2 clients" in printed and "round 2: succeeded" in printed and "finished" in printed, printed
    import numpy as np

    assert model.stat().st_size > 0 and len(np.load(model).files) == 4  # the quickstart MLP: w1, b1, w2, b2
    assert not list(NOTEBOOK.parent.glob("*.npz"))  # nothing written beside the notebook
    for log in work.glob("*.log"):  # each role it started stopped cleanly
        assert "Traceback" not in log.read_text(errors="replace"), f"{log.name}:\n{log.read_text(errors='replace')}"


def test_the_readme_shows_the_notebooks_first_five_lines() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(cell for cell in nb.cells if cell.cell_type == "code").source.splitlines()[:5]
    readme = (ROOT / "README.md").read_text()
    assert "```python\n" + "\n".join(first) + "\n```" in readme
