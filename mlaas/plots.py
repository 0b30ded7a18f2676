"""PNG plots for run directories and reports.

Matplotlib's object API (``Figure``) draws straight to files: no pyplot, no GUI backend, safe
in servers, threads and headless CI.
"""

from __future__ import annotations

import math
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


def tradeoff_plot(
    path: Path,
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float], tuple[float, float]]]],
    *,
    title: str,
) -> Path:
    """Detection delay against false-alarm rate, one panel per attack family and one line per
    detector as its threshold varies, a star at the deployed threshold: ``panels[family]
    [detector] = (false-alarm rates, median delays, (deployed rate, deployed delay))``.
    Where at most half of the attacks are caught (median delay infinite) the line runs along
    the top edge, marked as such."""
    columns = min(2, len(panels)) or 1
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows + 0.5), dpi=110)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    finite = [
        d for lines in panels.values() for _, delays, _ in lines.values() for d in delays
        if math.isfinite(d)
    ]  # fmt: skip
    ceiling = max(finite, default=500.0) * 2
    markers = ("o-", "s--", "^-.", "d:", "v-")
    for axis, (family, lines) in zip(axes, panels.items(), strict=False):
        for (label, (rates, delays, star)), marker in zip(lines.items(), markers, strict=False):
            shown = [d if math.isfinite(d) else ceiling for d in delays]
            (line,) = axis.plot(rates, shown, marker, markersize=3, label=label)
            axis.plot(
                [star[0]], [star[1] if math.isfinite(star[1]) else ceiling], "*",
                color=line.get_color(), markersize=13, markeredgecolor="black",
            )  # fmt: skip
        axis.axhline(ceiling, color="grey", linestyle=":", label="most missed")
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlim(-0.001, 1.0)
        axis.set_yscale("log")
        axis.set_title(f"Knockoff from {family}", fontsize="medium")
        axis.set_xlabel("false-alarm rate (benign clients flagged)")
        axis.set_ylabel("median queries to detection")
        axis.grid(True, alpha=0.3, which="both")
        axis.legend(loc="upper right", fontsize="x-small")
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(f"{title}\nstar: the deployed threshold", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path)
    return path
