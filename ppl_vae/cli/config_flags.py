"""Flags generated from the fields of the configuration dataclasses
(:class:`~ppl_vae.vae.VAEConfig`, :class:`~ppl_vae.training.TrainConfig`,
:class:`~ppl_vae.vae.M2Config`).

A :class:`ConfigFlag` names a field and its help text, nothing more: its default is the
field's default, its argparse type the field's annotation, its choices the constant the
configuration is checked against, and its place in a run's ``config.json`` the dataclass's
section and the field's name, so no default or choice is written twice. ``{default}`` in a
help text stands for the field's default. Also here: the data and model flags that ``train``
and ``sweep`` share, and the training flags they both have.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ppl_vae.cli.options import add_data_dir_argument, hidden_sizes
from ppl_vae.data import BINARIZE_MODES, DATASETS
from ppl_vae.models import vae as vae_model
from ppl_vae.training import TrainConfig
from ppl_vae.vae import M2Config, VAEConfig

__all__ = [
    "BATCH_SIZE",
    "EPOCHS",
    "LR",
    "MODEL_FLAGS",
    "SECTIONS",
    "SEED",
    "ConfigFlag",
    "add_flags",
    "add_model_arguments",
    "build_config",
    "config_default",
    "given_settings",
    "settings_places",
    "vae_config_from_args",
]

SECTIONS: dict[type, str] = {VAEConfig: "vae", TrainConfig: "train", M2Config: "m2"}
"""The section of a run's ``config.json`` that holds each configuration's fields."""

# What a field's annotation (``X`` or ``X | None``) gives as argparse type; text stays text.
_PARSERS: dict[Any, Callable[[str], Any] | None] = {int: int, float: float, str: None}


def config_default(config: type, name: str) -> Any:
    """The default of the field ``name`` of the dataclass ``config``."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{config.__name__}.{name} has no default to give a flag")


def _show(value: Any, none: str) -> str:
    """A default as the help text writes it: 0.001, 400 or 300,300, ``none`` for None."""
    if value is None:
        return none
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """The flag ``--NAME`` that sets the field ``name`` of the dataclass ``config``.

    :param help: the help text; ``{default}`` in it stands for the field's default.
    :param option: the flag's name (without ``--``) when it is not the field's:
        ``--particles`` sets ``num_particles``.
    :param choices: the values the configuration accepts; a ``None`` among them is the
        default when nothing is given, not a value to type.
    :param parse: the argparse type, for a field annotated other than int, float or str.
    :param none: how a ``None`` default reads in the help.
    """

    config: type
    name: str
    help: str
    option: str | None = None
    choices: Sequence[Any] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    none: str = "none"

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in: ``option``, else the field's name."""
        return self.option or self.name

    @property
    def default(self) -> Any:
        """The field's default."""
        return config_default(self.config, self.name)

    @property
    def place(self) -> tuple[str, str]:
        """Where the value sits in a run's ``config.json``: (section, field)."""
        return SECTIONS[self.config], self.name

    def argparse_type(self) -> Callable[[str], Any] | None:
        """``parse``, else the type the field's annotation names (``None`` keeps the text)."""
        if self.parse is not None:
            return self.parse
        hint = typing.get_type_hints(self.config)[self.name]
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        if hint not in _PARSERS:
            raise TypeError(f"{self.config.__name__}.{self.name}: give the flag a parse function")
        return _PARSERS[hint]

    def add(self, parser: argparse.ArgumentParser, *, defaults: bool) -> None:
        """Add the flag to ``parser``; with ``defaults=False`` its value stays ``None`` when not
        given (the help still names the field's default)."""
        choices = None if self.choices is None else [c for c in self.choices if c is not None]
        parser.add_argument(
            "--" + self.dest.replace("_", "-"),
            type=self.argparse_type(),
            choices=choices,
            default=self.default if defaults else None,
            metavar=self.metavar,
            help=self.help.replace("{default}", _show(self.default, self.none)),
        )


def add_flags(
    parser: argparse.ArgumentParser, flags: Iterable[ConfigFlag], *, defaults: bool
) -> None:
    """Add each of ``flags`` to ``parser``, in order (see :meth:`ConfigFlag.add`)."""
    for flag in flags:
        flag.add(parser, defaults=defaults)


def build_config(
    config: type, args: argparse.Namespace, flags: Iterable[ConfigFlag], **values: Any
) -> Any:
    """``config`` from the ``flags`` of its fields that were given (not ``None``) and
    ``values``; every other field keeps its default."""
    given = {
        flag.name: getattr(args, flag.dest)
        for flag in flags
        if flag.config is config and getattr(args, flag.dest) is not None
    }
    return config(**given, **values)


def settings_places(flags: Iterable[ConfigFlag]) -> dict[str, tuple[str, ...]]:
    """Each flag's argparse destination -> its place in a run's ``config.json``."""
    return {flag.dest: flag.place for flag in flags}


def given_settings(
    args: argparse.Namespace, places: Mapping[str, tuple[str, ...]]
) -> dict[str, Any]:
    """The settings given on the command line (not ``None``), nested as in ``config.json``
    by ``places`` (destination -> keys), tuples as lists."""
    given: dict[str, Any] = {}
    for dest, place in places.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        node = given
        for key in place[:-1]:
            node = node.setdefault(key, {})
        node[place[-1]] = value
    return given


# --- The flags of more than one command ------------------------------------------------------

MODEL_FLAGS = (
    ConfigFlag(
        VAEConfig,
        "dataset",
        "data set (default: {default}); digits ships with scikit-learn, the others are read from "
        "--data-dir, $PPL_VAE_DATA, the Debian package or the download cache",
        choices=DATASETS,
    ),
    ConfigFlag(
        VAEConfig,
        "likelihood",
        "p(x | z) (default: {default})",
        choices=vae_model.LIKELIHOODS,
    ),
    ConfigFlag(
        VAEConfig,
        "binarize",
        "binarisation of the grey images: none, static (once, seeded) or dynamic (a fresh "
        "draw every epoch; the test set binarised once). Default: dynamic for bernoulli, none "
        "otherwise",
        choices=BINARIZE_MODES,
    ),
    ConfigFlag(VAEConfig, "z_dim", "latent size (default: {default})"),
    ConfigFlag(
        VAEConfig,
        "hidden",
        "hidden layer sizes, e.g. 400 or 300,300 (default: {default})",
        parse=hidden_sizes,
    ),
)
"""The data and model flags: --dataset, --likelihood, --binarize, --z-dim, --hidden."""

EPOCHS = ConfigFlag(TrainConfig, "epochs", "passes over the data (default: {default})")
BATCH_SIZE = ConfigFlag(TrainConfig, "batch_size", "images per step (default: {default})")
LR = ConfigFlag(TrainConfig, "lr", "Adam's rate (default: {default})")
SEED = ConfigFlag(TrainConfig, "seed", "random seed (default: {default})")


def add_model_arguments(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The data and model flags that ``train`` and ``sweep`` share: --dataset, --data-dir,
    --likelihood, --binarize, --z-dim, --hidden. With ``defaults=False`` every value is left
    ``None`` when not given (``train`` compares the ones given with a resumed run's)."""
    dataset, *model = MODEL_FLAGS
    dataset.add(parser, defaults=defaults)
    add_data_dir_argument(parser)  # next to the --dataset it serves
    add_flags(parser, model, defaults=defaults)


def vae_config_from_args(args: argparse.Namespace, extra: Iterable[ConfigFlag] = ()) -> VAEConfig:
    """The :class:`~ppl_vae.vae.VAEConfig` named by :func:`add_model_arguments`' flags and
    ``extra`` (``--arch``, ``--sigma`` where the command has them)."""
    return build_config(VAEConfig, args, (*MODEL_FLAGS, *extra))
