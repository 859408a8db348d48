"""Running a lesson notebook in this process and driving its widgets.

A lesson's every interactive view is an ``ipywidgets.interactive(show, ...)`` held in a
notebook variable; ``show`` draws the view and returns the numbers it displays, so after a
widget moves, ``view.result`` holds what the learner reads. The tests set widget values,
read ``view.result`` and compare it with computations written in the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import ipywidgets
import matplotlib.pyplot as plt
import torch

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"


def code_cells(path: Path) -> list[str]:
    """The code cells of a notebook, IPython magics and shell lines dropped."""
    cells = json.loads(path.read_text())["cells"]
    out = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        out.append("\n".join(line for line in lines if not line.lstrip().startswith(("%", "!"))))
    return out


@contextlib.contextmanager
def _working_dir(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_notebook(name: str, workdir: Path) -> dict[str, Any]:
    """Execute notebook ``name`` top to bottom in ``workdir``; its variables."""
    namespace: dict[str, Any] = {"__name__": "__lesson__"}
    # A lesson may set torch's default dtype or thread count; the tests after it must not see it.
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        with _working_dir(workdir):
            for i, source in enumerate(code_cells(NOTEBOOKS / name)):
                try:
                    exec(compile(source, f"{name}[cell {i}]", "exec"), namespace)
                finally:
                    plt.close("all")  # a lesson draws many figures; the test reads numbers
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    return namespace


def interactives(namespace: dict[str, Any]) -> dict[str, ipywidgets.interactive]:
    """The notebook's interactive views, by variable name."""
    return {k: v for k, v in namespace.items() if isinstance(v, ipywidgets.interactive)}


class LessonError(AssertionError):
    """A lesson's view failed while a test drove it."""


_NOT_RUN = object()


class _Failures(logging.Handler):
    """Collects the exceptions ipywidgets logs instead of raising."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Driver:
    """Moves a view's widgets and returns what it then displays; remembers what it drove."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.views = interactives(namespace)
        self.driven: set[str] = set()

    def __call__(self, view: str, **values: Any) -> Any:
        """Set ``values`` (by keyword or description) on ``view``'s widgets; what it returns.

        :raises LessonError: when the view's function raised (outside IPython ipywidgets only
            logs that and keeps the previous result, which would pass unseen).
        """
        ui = self.views[view]
        controls = {c.description or getattr(c, "_kwarg", ""): c for c in ui.kwargs_widgets}
        by_kwarg = {c._kwarg: c for c in ui.kwargs_widgets}
        failures = _Failures()
        ui.log.addHandler(failures)
        try:
            for key, value in values.items():
                control = by_kwarg.get(key) or controls[key]
                control.value = value
            ui.result = _NOT_RUN
            ui.update()  # runs show() once more with every value in place
        finally:
            ui.log.removeHandler(failures)
            plt.close("all")
        if failures.records:
            raise LessonError(f"{view} raised: {failures.records[-1].getMessage()}")
        if ui.result is _NOT_RUN:
            raise LessonError(f"{view} did not run")
        self.driven.add(view)
        return ui.result

    def undriven(self) -> list[str]:
        return sorted(set(self.views) - self.driven)
