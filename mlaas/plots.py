"""PNG plots for run directories and reports.

Matplotlib's object API (``Figure``) draws straight to files: no pyplot, no GUI backend, safe
in servers, threads and headless CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure


def curve_plot(
    path: Path,
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    reference: tuple[str, float] | None = None,
    log_x: bool = True,
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> Path:
    """One line per series (a series of only ``None`` is left out), and a reference line."""
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    axis = figure.subplots()
    for (label, values), marker in zip(series.items(), ("o-", "s--", "^-.", "d:"), strict=False):
        if all(v is None for v in values):
            continue
        axis.plot(x, [float("nan") if v is None else v for v in values], marker, label=label)
    if reference is not None:
        axis.axhline(reference[1], color="grey", linestyle=":", label=reference[0])
    if log_x:
        axis.set_xscale("log")
        # Tick exactly the measured points, in plain numbers: 500, 1,000, 5,000.
        axis.set_xticks(list(x), [f"{v:,.0f}" for v in x])
        axis.minorticks_off()
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    return path
