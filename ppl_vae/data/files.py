"""Where the IDX files of MNIST and Fashion-MNIST are found, what to say when they are not,
and how to download them.

The four files (train and test images and labels, each optionally ``.gz``) are looked for,
in order, in: the ``data_dir`` argument, ``$PPL_VAE_DATA``, the Debian package's folder
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``; Fashion-MNIST only)
and the user cache ``~/.cache/ppl-vae/<name>`` (filled by :func:`download`). In each folder
they may also sit in ``<name>/`` or in torchvision's ``FashionMNIST/raw/`` or ``MNIST/raw/``;
the first folder holding all four wins. A missing dataset raises
:class:`~ppl_vae.errors.DatasetNotFoundError` listing every folder searched and every way to
get the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ppl_vae.errors import DataError, DatasetNotFoundError

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "DEBIAN_DIRS",
    "cache_dir",
    "default_search_dirs",
    "download",
]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist")
"""Names accepted by :func:`~ppl_vae.data.datasets.load`."""

DATA_ENV_VAR = "PPL_VAE_DATA"
"""Environment variable naming a folder that holds the IDX files."""

DEBIAN_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
"""Where Debian packages install a dataset, by dataset name."""

_DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
_TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_PRETTY_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits"}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}

# The four IDX files of an MNIST-style dataset, by role, without the optional ".gz".
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _canonical(name: str) -> str:
    """The name in :data:`DATASETS` that ``name`` stands for (case, ``_`` and aliases aside);
    DataError for an unknown dataset."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def cache_dir(name: str) -> Path:
    """The user cache folder of a dataset: ``$XDG_CACHE_HOME/ppl-vae/<name>``, by default
    ``~/.cache/ppl-vae/<name>``; :func:`download` puts files there."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ppl-vae" / _canonical(name)


def default_search_dirs(name: str) -> list[Path]:
    """Folders searched after ``data_dir`` and ``$PPL_VAE_DATA``: the Debian package's
    folder (if the dataset has one), then the user cache."""
    name = _canonical(name)
    dirs = [DEBIAN_DIRS[name]] if name in DEBIAN_DIRS else []
    dirs.append(cache_dir(name))
    return dirs


def _search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.extend(default_search_dirs(name))
    return dirs


def _candidates(name: str, base: Path) -> list[Path]:
    """Folders under one search folder where the four files may sit. The named subfolders
    come first: MNIST and Fashion-MNIST files have the same names, so a folder holding
    both sets must keep them apart."""
    return [base / name, base / _TORCHVISION_NAMES[name] / "raw", base]


def _locate(name: str, data_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """The four IDX files, by role, of the first folder that holds them all; else
    DatasetNotFoundError saying where it looked and how to get them."""
    searched: list[Path] = []
    partial: list[str] = []
    for base in _search_dirs(name, data_dir):
        searched.append(base)
        for folder in _candidates(name, base):
            if not folder.is_dir():
                continue
            found: dict[str, Path] = {}
            for role, stem in _IDX_FILES.items():
                for filename in (stem, stem + ".gz"):  # prefer the unpacked file
                    if (folder / filename).is_file():
                        found[role] = folder / filename
                        break
            if len(found) == len(_IDX_FILES):
                return found
            if found:
                missing = [_IDX_FILES[r] for r in _IDX_FILES if r not in found]
                partial.append(f"  {folder} lacks {', '.join(missing)}")
    raise DatasetNotFoundError(_not_found_message(name, searched, partial))


def _not_found_message(name: str, searched: list[Path], partial: list[str]) -> str:
    pretty = _PRETTY_NAMES[name]
    files = ", ".join(_IDX_FILES.values())
    lines = [
        f"{pretty} was not found. Looked for {files} (each may end in .gz), in these folders "
        f"and in their {name}/ and {_TORCHVISION_NAMES[name]}/raw/ subfolders:",
        *(f"  {d}" for d in searched),
    ]
    if partial:
        lines += ["Incomplete copies:", *partial]
    ways = []
    if name in _DEBIAN_PACKAGES:
        ways.append(
            f"apt-get install {_DEBIAN_PACKAGES[name]}   "
            f"(Debian/Ubuntu; installs to {DEBIAN_DIRS[name]})"
        )
    ways.append(f"--data-dir DIR or {DATA_ENV_VAR}=DIR, with DIR a folder holding the IDX files")
    ways.append(f"ppl-vae download {name}   (needs internet; saves to {cache_dir(name)})")
    lines.append(f"Get it in one of these {len(ways)} ways:")
    lines += [f"  {i}. {way}" for i, way in enumerate(ways, 1)]
    return "\n".join(lines)


def _fix_for(name: str, path: Path) -> str:
    """What to do about a bad file ``path`` of dataset ``name``: re-install the Debian
    package if it came from there, else re-download or replace it."""
    debian = DEBIAN_DIRS.get(name)
    if debian is not None and debian in path.parents:
        return f"re-install the package: apt-get install --reinstall {_DEBIAN_PACKAGES[name]}"
    return f"re-download it (ppl-vae download {name}) or replace it with a good copy"


def download(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Download MNIST or Fashion-MNIST with torchvision (needs internet) into ``root``, by
    default :func:`cache_dir`, where :func:`~ppl_vae.data.datasets.load` finds it; return the
    folder of the files."""
    key = _canonical(name)
    if key == "digits":
        raise DataError("'digits' ships with scikit-learn; there is nothing to download")
    root = Path(root).expanduser() if root is not None else cache_dir(key)
    from torchvision import datasets  # local import: only this path needs torchvision

    cls = datasets.FashionMNIST if key == "fashion-mnist" else datasets.MNIST
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)  # fetches train and test files alike
    except (OSError, RuntimeError) as exc:
        message = _not_found_message(key, [root], [])
        raise DatasetNotFoundError(
            f"downloading {_PRETTY_NAMES[key]} into {root} failed ({exc}).\n{message}"
        ) from exc
    return root / _TORCHVISION_NAMES[key] / "raw"
