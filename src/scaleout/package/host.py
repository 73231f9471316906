"""Run an importing package's callbacks in another Python (a managed env's), one process per task.

The client calls ``python -m scaleout.package.host ENTRY ... IN OUT`` through the dispatcher
runtime: the process imports the package's startup entry, calls ``startup(client)`` and runs
the one callback asked for, reading and writing the files a dispatcher command would (models
as numpyhelper .npz, settings and results as JSON). ``list OUT`` writes the callbacks that
startup() registers, so the client offers the same ones. Metrics logged by the callback reach
the client as marked lines on stdout.

    python -m scaleout.package.host build                 (SCALEOUT_BUILD_OUTPUT_DIR set)
    python -m scaleout.package.host list OUT
    python -m scaleout.package.host train IN OUT          (IN-metadata: settings)
    python -m scaleout.package.host validate IN OUT
    python -m scaleout.package.host predict IN OUT        (IN-metadata: params)
    python -m scaleout.package.host custom NAME IN OUT    (IN: params as JSON)
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleout.core.errors import PackageError

if TYPE_CHECKING:
    from scaleout.edge import EdgeClient
    from scaleout.package.interpreter import ProcessEnv
    from scaleout.package.project import Project

HOST = "python -m scaleout.package.host"


def attach_hosted(project: Project, penv: ProcessEnv, client: EdgeClient, timeout: float | None) -> None:
    """Register on ``client`` proxies of the callbacks the package's startup() registers,
    each running in a process of ``penv``'s Python."""
    import tempfile

    from scaleout.package.dispatcher import Dispatcher

    # "startup": what the client logs and reports when importing the package in that Python fails.
    commands = {"startup": f"{HOST} list", **{k: f"{HOST} {k}" for k in ("train", "validate", "predict")}}
    dispatcher = Dispatcher(project, penv, timeout, commands=commands, as_list=False)  # a named model keeps its names
    dispatcher.client = client
    with tempfile.TemporaryDirectory(prefix="scaleout-host-") as tmp:
        out = Path(tmp, "callbacks.json")
        dispatcher.run("startup", [str(out)])
        names = json.loads(out.read_text())
    if "train" in names:
        client.set_train_callback(dispatcher.train)
    if "validate" in names:
        client.set_validate_callback(dispatcher.validate)
    if "predict" in names:
        client.set_predict_callback(dispatcher.predict_model)
    for name in names:
        if name.startswith("custom:"):
            client.set_custom_callback(name.removeprefix("custom:"), functools.partial(_custom, dispatcher, name.removeprefix("custom:")))


def _custom(dispatcher: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    import shlex
    import tempfile

    dispatcher.commands["custom"] = f"{HOST} custom {shlex.quote(name)}"
    with tempfile.TemporaryDirectory(prefix="scaleout-task-") as tmp:
        inp, out = Path(tmp, "params.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps(params))
        dispatcher.run("custom", [str(inp), str(out)])
        return dispatcher._read_json(out, "custom", "OUT")  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    from scaleout.edge import EdgeClient, ScaleoutModel
    from scaleout.package.dispatcher import METRIC_MARK
    from scaleout.package.project import call_entry, describe_failure, load_project
    from scaleoututil.helpers.numpyhelper import Helper

    def sink(metrics: dict[str, float], step: int | None) -> None:
        print(METRIC_MARK + json.dumps({"metrics": metrics, "step": step}), flush=True)

    entry, *args = argv
    project = load_project(Path.cwd())
    edge = EdgeClient()
    edge._metric_sink = sink
    try:
        if entry == "build":  # SCALEOUT_BUILD_OUTPUT_DIR is set by the caller
            call_entry(project, "build")
            return 0
        call_entry(project, "startup", edge)
        if entry == "list":
            Path(args[0]).write_text(json.dumps(edge.registered()))
            return 0
        if entry == "custom":
            name, inp, out = args
            result = edge.run_custom(name, json.loads(Path(inp).read_text()))
            Path(out).write_text(json.dumps(result))
            return 0
        inp, out = args
        model = ScaleoutModel.from_model_params(Helper().load(inp))
        if entry == "train":
            from scaleout.core import payload

            settings = json.loads(Path(f"{inp}-metadata").read_text())
            data, metadata = edge.run_train(model.to_bytes(), settings)
            Helper().save(payload.decode(data), out)
            Path(f"{out}-metadata").write_text(json.dumps(metadata))
        elif entry == "validate":
            Path(out).write_text(json.dumps(edge.run_validate(model.to_bytes())))
        elif entry == "predict":
            params = json.loads(Path(f"{inp}-metadata").read_text())
            Path(out).write_text(json.dumps(edge.run_predict(model.to_bytes(), params)))
        else:
            print(f"scaleout.package.host: unknown entry {entry!r}", file=sys.stderr)
            return 2
    except PackageError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:  # the process edge: one line naming the package's file and line
        print(f"{entry} failed: {describe_failure(exc, project.root)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
