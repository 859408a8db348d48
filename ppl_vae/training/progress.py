"""The progress bar of a run (tqdm): steps done, the epoch, the running training value per
image (-summed loss / images seen: the ELBO when beta = 1, else the beta-ELBO) and the last
validation ELBO with its standard error.

With the guard lazy (CUDA) the running value costs a device read, so it is refreshed at
most every :data:`REFRESH_S` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["REFRESH_S", "Progress"]

REFRESH_S = 0.5
"""Seconds between two refreshes of the bar's running value."""


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    if row["val_elbo"] is None:
        return {}
    return {
        "val_elbo": f"{row['val_elbo']:.2f}±{row['val_elbo_se']:.2f}",
        "recon": f"{row['val_reconstruction']:.2f}",
        "kl": f"{row['val_kl']:.2f}",
    }


class Progress:
    """A bar over ``total`` steps, ``initial`` of them done (a resumed run); nothing shown
    unless ``enabled``. ``label`` names the running value (``"elbo"`` or ``"objective"``)."""

    def __init__(
        self,
        *,
        total: int,
        initial: int,
        enabled: bool,
        label: str,
        last_row: dict[str, Any] | None,
    ) -> None:
        self.enabled, self.label = enabled, label
        self.validation = _postfix(last_row) if last_row is not None else {}
        self.shown = time.perf_counter()
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.bar.set_description(f"epoch {epoch}/{epochs}")
        self.shown = time.perf_counter()

    def step(self, running: Callable[[], float]) -> None:
        """One step done; ``running()`` gives the running value when it is shown."""
        self.bar.update(1)
        if self.enabled and time.perf_counter() - self.shown > REFRESH_S:
            self.shown = time.perf_counter()
            self.bar.set_postfix({self.label: f"{running():.2f}/img", **self.validation})

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Show the epoch's validation numbers (none without validation)."""
        self.validation = _postfix(row)
        self.bar.set_postfix(self.validation)

    def close(self) -> None:
        self.bar.close()
