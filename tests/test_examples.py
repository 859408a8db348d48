"""Every example script runs with tiny flags, every notebook top to bottom."""

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


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")), ids=lambda p: p.name
)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
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
