"""What several benchmarks share: a random-init victim to serve, random images to send, CPU
time read from /proc, and the attack benches' server with its keys."""

from __future__ import annotations

import json
import os
import secrets
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlaas.apiclient import AdminClient
from mlaas.images import InputShape
from mlaas.models import build_model
from mlaas.modelstore import ModelCard, save_model, write_json_atomic
from testbed.serverproc import ServerProcess
from testbed.victim import train_victim

NUM_CLASSES = 10


def save_victim(root: Path, arch: str, shape: InputShape, seed: int) -> Path:
    """A random-init victim with a valid model card: enough for throughput."""
    torch.manual_seed(seed)
    model = build_model(arch, NUM_CLASSES, shape)
    card = ModelCard(
        name=f"bench-{arch}",
        architecture=arch,
        dataset="random-init",
        num_classes=NUM_CLASSES,
        classes=[f"class-{i}" for i in range(NUM_CLASSES)],
        input_shape=str(shape),
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        seed=seed,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return save_model(root / arch, model, card)


def random_images(shape: InputShape, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *shape.hwc), dtype=np.uint8)


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    steal = values[7] if len(values) > 7 else 0
    guest = sum(values[8:10])  # already counted in user/nice
    return (sum(values) - idle - steal - guest) / _TICK, steal / _TICK


def attack_bench_server(victim: Path, out: Path) -> tuple[ServerProcess, str]:
    """The server an attack bench runs against (not started) and its admin token: ``victim``
    (trained first if missing) with a SQLite log in ``out``, which is kept, so that a rerun's
    attacks resume from their caches against the same log."""
    if not (victim / "card.json").exists():
        train_victim(victim)
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    server = ServerProcess(
        victim,
        env={"MLAAS_DATABASE_URL": f"sqlite:///{out / 'mlaas.db'}", "MLAAS_ADMIN_TOKEN": token},
        log_file=out / "server.log",
    )
    return server, token


class KeyBook:
    """API keys by client name, kept next to the server's log so a rerun reuses them."""

    def __init__(self, path: Path, admin: AdminClient) -> None:
        self.path = path
        self.admin = admin
        self.keys: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def key(self, name: str, granularity: str | None = None) -> str:
        if name not in self.keys:
            self.keys[name] = self.admin.create_key(name, granularity)
            write_json_atomic(self.path, self.keys)
        return self.keys[name]


def int_list(text: str) -> list[int]:
    """A comma list of integers from the command line (``--seeds 0,1,2``)."""
    return [int(part) for part in text.split(",") if part.strip()]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves, one per seed."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": list(values),
    }


def percent(figures: dict[str, Any]) -> str:
    """A :func:`spread` of shares as "63.9% ± 1.3" (the spread in points)."""
    return f"{figures['mean']:.1%} ± {figures['std'] * 100:.1f}"
