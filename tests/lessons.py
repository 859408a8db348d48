"""Running a lesson notebook in this process and driving its widgets.

A lesson's every interactive view is an ``ipywidgets.interactive(show, ...)`` held in a
notebook variable; ``show`` draws the view and returns the numbers it displays, so after a
widget moves, ``view.result`` holds what the learner reads. The tests set widget values,
read ``view.result`` and compare it with computations written in the test.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import ipywidgets
import matplotlib.pyplot as plt

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
    with _working_dir(workdir):
        for i, source in enumerate(code_cells(NOTEBOOKS / name)):
            try:
                exec(compile(source, f"{name}[cell {i}]", "exec"), namespace)
            finally:
                plt.close("all")  # a lesson draws many figures; the test reads numbers
    return namespace


def interactives(namespace: dict[str, Any]) -> dict[str, ipywidgets.interactive]:
    """The notebook's interactive views, by variable name."""
    return {k: v for k, v in namespace.items() if isinstance(v, ipywidgets.interactive)}


class Driver:
    """Moves a view's widgets and returns what it then displays; remembers what it drove."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.views = interactives(namespace)
        self.driven: set[str] = set()

    def __call__(self, view: str, **values: Any) -> Any:
        ui = self.views[view]
        controls = {c.description or getattr(c, "_kwarg", ""): c for c in ui.kwargs_widgets}
        by_kwarg = {c._kwarg: c for c in ui.kwargs_widgets}
        for key, value in values.items():
            control = by_kwarg.get(key) or controls[key]
            control.value = value
        ui.update()  # runs show() even when no value changed
        plt.close("all")
        self.driven.add(view)
        return ui.result

    def undriven(self) -> list[str]:
        return sorted(set(self.views) - self.driven)
