"""What one victim's run measured (:class:`Result`) and the tables that print it."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import NUM_CLASSES
from bench.servelib.phases import Phase
from bench.servelib.plan import NOISY_CORES, TARGET_NPY, TARGET_SINGLE, Plan
from mlaas.images import InputShape

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


@dataclass
class Result:
    arch: str
    shape: InputShape
    b256_before: list[float] = field(default_factory=list)
    b256_after: list[float] = field(default_factory=list)
    b1_before: list[float] = field(default_factory=list)
    b1_after: list[float] = field(default_factory=list)
    npy: Phase | None = None
    single: Phase | None = None
    ceiling: Phase | None = None
    inproc_other: list[float] = field(default_factory=list)  # cores used by other processes
    loop: str = ""
    log_rows: dict[str, int] = field(default_factory=dict)
    log_error: str | None = None
    stop_code: int | None = None
    error: str | None = None

    @property
    def b256(self) -> float:
        return statistics.median(self.b256_before + self.b256_after)

    @property
    def b1(self) -> float:
        return statistics.median(self.b1_before + self.b1_after)

    def phases(self) -> list[Phase]:
        return [p for p in (self.npy, self.single, self.ceiling) if p is not None]

    @property
    def other_max(self) -> float:
        """The most cores other processes used during any measurement of this victim."""
        others = [p.cores().get("other", 0.0) for p in self.phases()] + self.inproc_other
        return max(others, default=0.0)

    @property
    def noisy(self) -> bool:
        return self.other_max > NOISY_CORES


def _verdict(ratio: float, target: float, noisy: bool) -> str:
    text = (
        f"[green]meets target >= {target:g}[/]"
        if ratio >= target
        else f"[red]misses target >= {target:g}[/]"
    )
    return text + (" [yellow](unreliable: machine busy)[/]" if noisy else "")


def _spread(before: list[float], after: list[float], other: list[float]) -> str:
    text = f"median of {len(before) + len(after)} reps; before server "
    text += f"{statistics.median(before):,.0f}"
    if after:
        text += f", after {statistics.median(after):,.0f}"
    if other:
        text += "\nother processes: " + ", ".join(f"{o:.2f}" for o in other) + " cores"
    return text


def _phase_details(phase: Phase) -> str:
    parts = [f"{phase.requests:,} req in {phase.window_s:.1f} s"]
    if phase.latencies:
        lat = np.array(phase.latencies) * 1000.0
        parts.append(f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
    if phase.per_request:
        parts.append(f"mean forward batch {phase.mean_forward_batch():.1f}")
    cores = phase.cores()
    if cores:
        text = (
            f"cores busy: server {cores['server']:.2f}, client {cores['client']:.2f}, "
            f"other {cores['other']:.2f}"
        )
        if cores["steal"] > 0.01:
            text += f", stolen {cores['steal']:.2f}"
        parts.append(text)
    start, end = phase.cpu_start, phase.cpu_end
    if phase.requests and start is not None:
        server_cpu = (end.server - start.server) if end else 0.0
        client_cpu = (end.client - start.client) if end else 0.0
        text = (
            f"CPU/req: server {server_cpu / phase.requests * 1e3:.2f} ms, "
            f"client {client_cpu / phase.requests * 1e3:.2f} ms"
        )
        if phase.per_request > 1:
            text += f" (server {server_cpu / phase.images * 1e6:.0f} us/image)"
        parts.append(text)
    if phase.per_request:
        parts.append(f"query log drained {phase.drain_s:.2f} s after the last answer")
    refused = [f"HTTP {s}: {n}" for s, n in sorted(phase.statuses.items())]
    refused += [f"{name}: {n}" for name, n in sorted(phase.errors.items())]
    if refused:
        parts.append("[red]non-200: " + ", ".join(refused) + "[/]")
    if phase.wrong_counts:
        parts.append(f"[red]{phase.wrong_counts} answers with a wrong prediction count[/]")
    return "\n".join(parts)


def report(result: Result, plan: Plan) -> None:
    if not (result.b256_before and result.b1_before):
        console.print(f"[red]{result.arch}: no in-process figures[/]")
        return
    table = Table(title=f"{result.arch} ({result.shape}, {NUM_CLASSES} classes, random init)")
    table.add_column("measurement")
    table.add_column("images/s", justify="right")
    table.add_column("details")
    table.add_row(
        "in-process batch-256",
        f"{result.b256:,.0f}",
        _spread(result.b256_before, result.b256_after, result.inproc_other),
    )
    table.add_row(
        "in-process batch-1", f"{result.b1:,.0f}", _spread(result.b1_before, result.b1_after, [])
    )
    phases = [
        (f"HTTP x-npy {plan.npy_batch} ({plan.npy_concurrency} in flight)", result.npy),
        (f"HTTP {plan.single_clients} single-image clients", result.single),
    ]
    for label, phase in phases:
        if phase is None:
            table.add_row(label, "-", "[red]not measured[/]")
        else:
            table.add_row(label, f"{phase.rate:,.0f}", _phase_details(phase))
    if result.ceiling is not None:
        table.add_row(
            f"ceiling: {plan.single_clients} clients GET /healthz (no model, auth or log)",
            f"({result.ceiling.rate:,.0f} req/s)",
            _phase_details(result.ceiling),
        )
    table.add_section()
    if result.npy is not None:
        ratio = result.npy.rate / result.b256
        table.add_row(
            f"HTTP x-npy {plan.npy_batch} / in-process batch-256",
            f"{ratio:.2f}",
            _verdict(ratio, TARGET_NPY, result.noisy),
        )
    if result.single is not None:
        ratio = result.single.rate / result.b1
        # For scale: what batching alone gains in-process. Micro-batched single-image requests
        # can hardly beat in-process batches, so a ratio target above this gain is out of reach.
        gain = result.b256 / result.b1
        table.add_row(
            f"HTTP {plan.single_clients} concurrent single / in-process batch-1",
            f"{ratio:.2f}",
            _verdict(ratio, TARGET_SINGLE, result.noisy)
            + f"\nfor scale: in-process batch-256 / batch-1 = {gain:.2f} (batching's own gain)",
        )
    console.print(table)

    phases_run = result.phases()
    answered = sum(p.answered_images for p in (result.npy, result.single) if p is not None)
    refused = sum(p.refused for p in phases_run)
    console.print(
        f"answered images (HTTP 200): {answered:,}; non-200 or failed requests: {refused}"
    )
    if result.log_error:
        console.print(f"[red]query log could not be counted: {result.log_error}[/]")
    elif result.log_rows:
        rows = result.log_rows["total"]
        per_client = ", ".join(f"{k} {v:,}" for k, v in result.log_rows.items() if k != "total")
        ok = "[green]equal[/]" if rows == answered else "[red]NOT equal[/]"
        console.print(
            f"query log after stop: {rows:,} rows ({per_client}); answered images {answered:,}: "
            f"{ok}; server exit code {result.stop_code}"
        )
    if result.noisy:
        console.print(
            f"[yellow]warning: other processes kept up to {result.other_max:.2f} cores busy "
            "during a measurement; these figures are disturbed (rerun on a quiet machine)[/]"
        )
    if result.error:
        console.print(f"[red]{result.arch}: {result.error}[/]")
    console.print()


def summary(results: list[Result], plan: Plan) -> None:
    table = Table(title="Ratios (measured side by side in this run)")
    table.add_column("victim")
    table.add_column(f"x-npy {plan.npy_batch} / batch-256", justify="right")
    table.add_column(f"{plan.single_clients} single / batch-1", justify="right")
    table.add_column("in-process batch-256 / batch-1", justify="right")
    for result in results:
        cells = []
        for phase, base, target in (
            (result.npy, result.b256 if result.b256_before else 0.0, TARGET_NPY),
            (result.single, result.b1 if result.b1_before else 0.0, TARGET_SINGLE),
        ):
            if phase is None or not base:
                cells.append("-")
                continue
            ratio = phase.rate / base
            colour = "green" if ratio >= target else "red"
            flag = " [yellow]unreliable[/]" if result.noisy else ""
            cells.append(f"[{colour}]{ratio:.2f}[/] (target {target:g}){flag}")
        cells.append(f"{result.b256 / result.b1:.2f}" if result.b1_before else "-")
        table.add_row(result.arch, *cells)
    console.print(table)
