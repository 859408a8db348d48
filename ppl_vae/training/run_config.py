"""A run's configuration as it is recorded: once, in ``config.json`` in the run's folder, and in
every checkpoint as its digest

    digest = SHA-256(canonical JSON of the configuration without RUNTIME_SETTINGS),

canonical JSON having sorted keys and no whitespace. The configuration is ``{"train": the
TrainConfig, ...}`` plus the caller's other sections (a VAE run: ``"vae"`` and ``"data"``);
the runtime settings (:data:`~ppl_vae.training.config.RUNTIME_SETTINGS`: device, progress,
threads, checkpoint interval) are left out of the digest, as they may change on resume.
A run resumes only with the configuration whose digest its checkpoint holds; when asked with
another, the run's ``config.json``, checked against that digest, names the differences.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ppl_vae.atomic import json_ready
from ppl_vae.checkpoint import Checkpoint
from ppl_vae.errors import ConfigMismatchError
from ppl_vae.training.config import RUNTIME_SETTINGS, TrainConfig

__all__ = [
    "CONFIG_FILE",
    "check_configuration",
    "config_differences",
    "config_digest",
    "run_configuration",
]

CONFIG_FILE = "config.json"
"""The file in a run's folder that holds its configuration."""

_RUNTIME_KEYS = tuple(f"train.{key}" for key in RUNTIME_SETTINGS)


def config_digest(configuration: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of the canonical JSON of ``configuration`` (nested plain JSON, tuples
    as lists) without the runtime settings of its ``"train"`` section.

    :raises TypeError: for a value that is not plain JSON.
    """
    values = json_ready(dict(configuration))
    train = values.get("train")
    if isinstance(train, dict):
        values["train"] = {k: v for k, v in train.items() if k not in RUNTIME_SETTINGS}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_configuration(
    config: TrainConfig,
    run_config: Mapping[str, Any] | None = None,
    beta_schedule: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """The configuration of a run of ``config``: ``{"train": config.to_dict(), **run_config}``,
    with ``train.beta`` null when a Python ``beta_schedule`` overrides it (a function has no
    text form to record).

    :raises ValueError: when ``run_config`` has a ``"train"`` section or is not plain JSON.
    """
    run_config = dict(run_config or {})
    if "train" in run_config:
        raise ValueError("run_config holds the sections besides 'train' (the TrainConfig's)")
    train = config.to_dict()
    if beta_schedule is not None:
        train["beta"] = None
    configuration = {"train": train, **run_config}
    try:
        config_digest(configuration)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run_config must be plain JSON: {exc}") from None
    return configuration


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def config_differences(
    saved: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    partial: bool = False,
    ignore: tuple[str, ...] = (),
) -> list[str]:
    """The differences between two nested plain-JSON configurations, one line per key, as
    ``"train.lr: saved 0.01, asked 0.001"`` (numbers compare by value, tuples as lists).

    :param partial: compare only the keys ``wanted`` has (settings given on a command line).
    :param ignore: dotted keys not compared (``"train.device"``).
    """
    saved = json.loads(json.dumps(dict(saved)))
    wanted = json.loads(json.dumps(dict(wanted)))
    out: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        keys = set(b) if partial else set(a) | set(b)
        for key in sorted(keys):
            dotted = f"{prefix}{key}"
            if dotted in ignore:
                continue
            if key not in a:
                out.append(f"{dotted}: not saved, asked {_show(b[key])}")
            elif key not in b:
                out.append(f"{dotted}: saved {_show(a[key])}, not given now")
            elif isinstance(a[key], dict) and isinstance(b[key], dict):
                walk(a[key], b[key], f"{dotted}.")
            elif a[key] != b[key] or isinstance(a[key], bool) != isinstance(b[key], bool):
                out.append(f"{dotted}: saved {_show(a[key])}, asked {_show(b[key])}")

    walk(saved, wanted, "")
    return out


def check_configuration(
    checkpoint: Checkpoint, configuration: Mapping[str, Any], config_files: Iterable[Path]
) -> None:
    """Refuse to resume from ``checkpoint`` with a configuration other than the one whose
    digest it holds, up to the runtime settings and to settings added (or removed) since it
    was written, which take their defaults. The differences are named from the first of
    ``config_files`` (the run's ``config.json``) whose digest is the checkpoint's.

    :raises ConfigMismatchError: listing the differences, or with none listed when no
        config file holds the checkpoint's configuration (changed by hand, or missing).
    """
    if checkpoint.config_digest == config_digest(configuration):
        return
    where = f"checkpoint {checkpoint.path}"
    files = list(dict.fromkeys(config_files))
    saved = _recorded(checkpoint.config_digest, files)
    if saved is None:
        raise ConfigMismatchError(
            f"cannot resume from {where} with another configuration, and "
            f"{' or '.join(str(f) for f in files) or CONFIG_FILE} was changed since it was "
            "written or is missing, so the differences cannot be named. Resume with the "
            "run's own settings, or start a new run in another folder.",
            differences=[],
        )
    try:  # settings added (or removed) since the file was written take their defaults
        saved["train"] = TrainConfig.from_dict(saved.get("train", {})).to_dict()
    except (TypeError, ValueError):
        pass  # compared as saved: the differences name what is wrong
    differences = config_differences(saved, configuration, ignore=_RUNTIME_KEYS)
    if differences:
        raise ConfigMismatchError(
            f"cannot resume from {where} with another configuration: "
            f"{'; '.join(differences)}. Resume with the run's own settings, or start a "
            "new run in another folder.",
            differences=differences,
        )


def _recorded(digest: str | None, files: list[Path]) -> dict[str, Any] | None:
    """The configuration in the first of ``files`` that reads as JSON with that digest."""
    for path in files:
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(values, dict) and config_digest(values) == digest:
            return values
    return None
