"""``ppl-vae lessons``: the interactive lessons (Jupyter notebooks with sliders), listed in
reading order and opened in JupyterLab (``pip install 'ppl-vae[lessons]'``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ppl_vae.errors import ArgumentError

__all__ = ["add_parser", "find_lessons", "lesson_title"]

INSTALL_HINT = "pip install 'ppl-vae[lessons]' (ipywidgets, a kernel and JupyterLab)"


def default_folder() -> Path:
    """The lessons of a source checkout: examples/notebooks beside the package."""
    return Path(__file__).resolve().parents[2] / "examples" / "notebooks"


def lesson_title(path: Path) -> str:
    """The first Markdown heading of a notebook, or its file name."""
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError) as error:
        raise ArgumentError(f"{path} is not a readable notebook: {error}") from None
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def find_lessons(folder: Path) -> list[Path]:
    """The numbered notebooks of ``folder`` in reading order (their names start with NN_)."""
    if not folder.is_dir():
        raise ArgumentError(
            f"no lessons folder {folder}: the lessons are the notebooks in examples/notebooks "
            "of a source checkout of ppl-vae; give their folder with --dir"
        )
    lessons = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not lessons:
        raise ArgumentError(f"{folder} holds no lesson notebooks (NN_name.ipynb)")
    return lessons


def _run(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else default_folder()
    lessons = find_lessons(folder)
    for path in lessons:
        print(f"{path.name[:2]}  {lesson_title(path)}  ({path})")
    if not args.open:
        print(f"\nopen them: ppl-vae lessons --open (JupyterLab; needs {INSTALL_HINT})")
        return 0
    missing = [m for m in ("jupyterlab", "ipywidgets", "ipykernel") if not _installed(m)]
    if missing:
        raise ArgumentError(
            f"cannot open the lessons: {', '.join(missing)} missing; {INSTALL_HINT}"
        )
    # JupyterLab runs until the user stops it (Ctrl-C), in the lessons' folder.
    command = [sys.executable, "-m", "jupyterlab", str(folder)]
    return subprocess.call(command, cwd=folder, env=os.environ.copy())


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def add_parser(subparsers: Any) -> None:
    """Add the ``lessons`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    parser = subparsers.add_parser(
        "lessons",
        help="list the interactive lessons (notebooks with sliders) and open them",
        description="List the interactive lessons in reading order: the ELBO on the binary "
        "toy, what the KL term asks, one sample is enough, beta and the latent space, KL is "
        f"all you need, a VAE on digits. --open starts JupyterLab on them ({INSTALL_HINT}).",
        epilog="example: ppl-vae lessons --open",
    )
    parser.add_argument("--open", action="store_true", help="open them in JupyterLab")
    parser.add_argument(
        "--dir", default=None, help="the lessons' folder (default: examples/notebooks)"
    )
    parser.set_defaults(handler=_run)
