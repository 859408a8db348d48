"""Every example script runs with tiny flags; every notebook is a lesson whose widgets are
driven by its own test module, and the first runs through a Jupyter kernel."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

# Each example with flags that keep it to seconds.
EXAMPLES = {
    "01_binary_toy.py": ["--particles", "10,100", "--svi-steps", "50"],
    "02_vae_fashion_mnist.py": [
        "--dataset",
        "digits",
        "--z-dim",
        "4",
        "--hidden",
        "32",
        "--epochs",
        "1",
        "--iwae-k",
        "10",
        "--test-images",
        "50",
        "--no-progress",
    ],
    "03_beta_sweep.py": [
        "--dataset",
        "digits",
        "--beta",
        "0.5,2",
        "--z-dim",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "1",
        "--train-subset",
        "200",
        "--iwae-k",
        "5",
        "--test-images",
        "30",
        "--no-report",
        "--no-progress",
    ],
    "04_semi_supervised.py": [
        "--dataset",
        "digits",
        "--labels",
        "20",
        "--z-dim",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "1",
        "--train-subset",
        "300",
        "--iwae-k",
        "5",
        "--test-images",
        "30",
        "--no-progress",
    ],
    "05_distributed_own_pair.py": [
        "--dataset",
        "digits",
        "--z-dim",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "1",
        "--train-subset",
        "300",
        "--no-progress",
    ],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--out", str(tmp_path), *EXAMPLES[name]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.rglob("*.png")), "the example saves its figures as PNG"


NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))


def _lesson_tests() -> dict[str, str]:
    """Notebook name -> the test module that runs it in-process and drives its widgets."""
    out = {}
    for path in sorted((ROOT / "tests").glob("test_lesson_*.py")):
        match = re.search(r'^NOTEBOOK = "([^"]+)"', path.read_text(), re.M)
        if match:
            out[match.group(1)] = path.name
    return out


def test_every_notebook_is_a_numbered_lesson_with_its_widget_tests():
    # Each runs top to bottom in tests/test_lesson_NN.py, which drives every widget.
    lessons = _lesson_tests()
    for path in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"{path.name}: not NN_name"
        assert path.name in lessons, f"{path.name} has no tests/test_lesson_NN.py driving it"
        assert lessons[path.name].startswith(f"test_lesson_{path.name[:2]}"), lessons[path.name]


def test_the_first_lesson_runs_in_a_jupyter_kernel(tmp_path):
    # The lessons' tests run the cells in-process; one goes through a real kernel, widgets and
    # all, as a learner's notebook does.
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    widgets = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, "the lesson shows its widgets"
