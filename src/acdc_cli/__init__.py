"""acdc: sparse image classifiers trained with AC/DC (Peste et al., NeurIPS 2021).

``from acdc_cli import ACDC`` is the engine for your own training loop (see :mod:`acdc_cli.engine`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from acdc_cli.version import __version__

__all__ = ["ACDC", "Phase", "__version__"]

if TYPE_CHECKING:
    from acdc_cli.engine import ACDC
    from acdc_cli.sparsity.schedule import Phase


def __getattr__(name: str) -> Any:
    # imported on first use: the command line reads __version__ without paying for torch
    if name == "ACDC":
        from acdc_cli.engine import ACDC

        return ACDC
    if name == "Phase":
        from acdc_cli.sparsity.schedule import Phase

        return Phase
    raise AttributeError(f"module 'acdc_cli' has no attribute '{name}'")
