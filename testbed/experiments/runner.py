"""Running an experiment matrix, resumably, each cell against a real server over HTTP.

``OUT/config.yaml``            the configuration as run
``OUT/victims/NAME-sSEED/``    trained victims (and their detectors), reused across runs
``OUT/cells/ID.json``          one record per cell: ``ok`` with its metrics, or ``failed``
``OUT/groups/ID.json``         per server group: benign clients' accuracy and false alarms
``OUT/runs/ID/``               each attack's run directory (cache, curve, substitute)

Cells sharing a victim, defense and seed share one ``mlaas serve`` process; each cell's
attacker has its own API key, whose granularity is the cell's. A rerun skips cells whose
record says ``ok``; a failing cell is recorded and the others go on.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import time
import traceback
from collections.abc import Callable
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.modelstore import ModelCard, load_card, write_json_atomic
from testbed.benign import benign_images, run_benign_client
from testbed.experiments.config import Cell, DefenseSpec, ExperimentConfig, VictimSpec
from testbed.serverproc import ServerProcess


def cell_record(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = out / "cells" / f"{cell.id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ensure_victim(out: Path, spec: VictimSpec, seed: int, device: str) -> tuple[Path, ModelCard]:
    from mlaas.training import TrainConfig
    from testbed.victim import train_victim

    directory = out / "victims" / f"{spec.name}-s{seed}"
    try:
        return directory, load_card(directory)
    except (FileNotFoundError, ValueError):
        pass
    shape = InputShape.parse(spec.input_shape) if spec.input_shape else None
    card = train_victim(
        directory,
        dataset=spec.dataset,
        arch=spec.arch,
        config=TrainConfig(epochs=spec.epochs, seed=seed, device=device),
        shape=shape,
        pretrained=spec.pretrained,
        name=spec.name,
        train_size=spec.train_size,
        progress=False,
    )
    return directory, card


def ensure_detectors(victim_dir: Path, detectors: list[str]) -> None:
    from defense.detectors import artifact_path
    from defense.training import train_detectors

    missing = [d for d in detectors if not artifact_path(victim_dir / "defense", d).exists()]
    if missing:
        train_detectors(missing, victim_dir)


def _server(victim_dir: Path, defense: DefenseSpec, database: Path, token: str, log: Path):
    env = {
        "MLAAS_DATABASE_URL": f"sqlite:///{database}",
        "MLAAS_ADMIN_TOKEN": token,
        "MLAAS_DETECTORS": ",".join(defense.detectors),
        "MLAAS_POLICY": defense.policy,
        "MLAAS_PERTURBATION": defense.perturbation,
    }
    if defense.deceive:
        env["MLAAS_DECEIVE"] = defense.deceive
    return ServerProcess(victim_dir, env=env, log_file=log)


def _benign(
    url: str, admin: AdminClient, config: ExperimentConfig, card: ModelCard, seed: int
) -> dict[str, Any]:
    """Benign clients: their accuracy through the API, and whether any detector alarmed."""
    dataset = card.dataset.split(":")[0]
    try:
        pool = load_dataset(f"{dataset}:pool", card.shape)
    except ValueError:
        pool = load_dataset(f"{dataset}:test", card.shape)
    clients = []
    for index in range(config.benign.clients):
        name = f"benign-{index + 1}"
        rng = np.random.default_rng([seed, index])
        shift = config.benign.shifts[index % len(config.benign.shifts)]
        images, labels = benign_images(pool, config.benign.queries, rng, shift)
        result = run_benign_client(url, admin.create_key(name), images, labels)
        clients.append(
            {"client": name, "shift": shift, "queries": result.queries, "accuracy": result.accuracy}
        )
    admin.wait_for_log(sum(c["queries"] for c in clients), timeout=30)
    time.sleep(0.3)
    for client in clients:
        client["alerts"] = {
            a["detector"]: a["query_count"] for a in admin.client(client["client"])["alerts"]
        }
    return {
        "clients": clients,
        "accuracy": float(np.mean([c["accuracy"] for c in clients])) if clients else None,
        "false_alarm_rate": float(np.mean([bool(c["alerts"]) for c in clients]))
        if clients
        else None,
    }


def attack_config(cell: Cell, config: ExperimentConfig):
    """The cell's attack, as the attacker CLI would configure it."""
    from attacker.attacks import AttackConfig

    spec = cell.attacker
    options: dict[str, Any] = {
        "budget": spec.budget,
        "checkpoints": sorted(spec.budgets),
        "strategy": spec.strategy,
        "reward": spec.reward,
        "arch": spec.arch,
        "pretrained": spec.pretrained,
        "test_set": cell.victim.evaluation_set,
        "eval_size": config.eval_size,
        "seed": cell.seed,
        "device": config.device,
    }
    for name in ("epochs", "seed_size"):
        if getattr(spec, name) is not None:
            options[name] = getattr(spec, name)
    if spec.transfer is not None:  # "{dataset}" stands for the victim's data set
        options["transfer"] = spec.transfer.format(dataset=cell.victim.dataset)
    return AttackConfig.for_attack(spec.attack, **options)


def check_cell(cell: Cell, config: ExperimentConfig) -> None:
    """Build everything a cell needs without data or training: configurations, data set
    names, architectures. Raises ValueError on the first problem."""
    from mlaas.datasets import native_shape
    from mlaas.models import architecture_names
    from server.settings import ServerSettings

    attack = attack_config(cell, config)
    for spec in (cell.victim.dataset, cell.victim.evaluation_set):
        native_shape(spec)
    if not attack.transfer.startswith("/"):
        native_shape(attack.transfer)
    for arch in (cell.victim.arch, attack.arch):
        if arch not in architecture_names():
            raise ValueError(f"unknown architecture {arch!r}")
    ServerSettings(
        detectors=",".join(cell.defense.detectors),
        policy=cell.defense.policy,
        perturbation=cell.defense.perturbation,
        granularity=cell.granularity,
        **({"deceive": cell.defense.deceive} if cell.defense.deceive else {}),
    )


def _attack(url: str, admin: AdminClient, cell: Cell, out: Path, experimenter: str, config):
    from attacker.runner import run_attack

    attack = attack_config(cell, config)
    key_name = f"attacker-{cell.id[-8:]}-{secrets.token_hex(3)}"
    key = admin.create_key(key_name, cell.granularity)
    run_dir = out / "runs" / cell.id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished cell starts over: its client is new
    metrics = run_attack(
        attack, url=url, keys=[key], out=run_dir, eval_key=experimenter, progress=False,
        console=Console(file=io.StringIO()),
    )  # fmt: skip
    stats = admin.stats()
    admin.wait_for_log(stats["log_rows_written"] + stats["log_rows_pending"], 30)
    time.sleep(0.3)
    alerts = {a["detector"]: a["query_count"] for a in admin.client(key_name)["alerts"]}
    return metrics, alerts


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    console: Console | None = None,
    config_text: str | None = None,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> dict[str, int]:
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_text or yaml.safe_dump(config.model_dump()))
    cells = config.cells()
    counts = {"cells": len(cells), "skipped": 0, "ok": 0, "failed": 0}
    ordered = sorted(cells, key=lambda c: c.group)
    for group, members in groupby(ordered, key=lambda c: c.group):
        members = list(members)
        pending = [c for c in members if (cell_record(out, c) or {}).get("status") != "ok"]
        counts["skipped"] += len(members) - len(pending)
        if not pending:
            continue
        first = pending[0]
        group_id = "--".join(str(g) for g in group)
        console.print(f"[bold]{group_id}[/]: {len(pending)} cells to run")
        try:
            victim_dir, card = ensure_victim(out, first.victim, first.seed, config.device)
            if first.defense.detectors:
                ensure_detectors(victim_dir, first.defense.detectors)
        except Exception as exc:  # the whole group cannot run without its victim
            for cell in pending:
                _record_failure(out, cell, exc, counts, on_cell)
            continue
        token = secrets.token_urlsafe(32)
        database = out / "servers" / f"{group_id}.db"
        database.parent.mkdir(parents=True, exist_ok=True)
        database.unlink(missing_ok=True)
        server = _server(victim_dir, first.defense, database, token, database.with_suffix(".log"))
        try:
            with server, AdminClient(server.url, token) as admin:
                experimenter = admin.create_key("experimenter")
                group_path = out / "groups" / f"{group_id}.json"
                if not group_path.exists():
                    write_json_atomic(
                        group_path,
                        {"group": group_id, "seed": first.seed,
                         "victim": card.model_dump(mode="json"),
                         "defense": first.defense.model_dump(),
                         "benign": _benign(server.url, admin, config, card, first.seed)},
                    )  # fmt: skip
                for cell in pending:
                    started = time.perf_counter()
                    console.print(f"  {cell.id}")
                    try:
                        metrics, alerts = _attack(
                            server.url, admin, cell, out, experimenter, config
                        )
                    except Exception as exc:
                        _record_failure(out, cell, exc, counts, on_cell)
                        continue
                    record = {
                        "status": "ok",
                        "id": cell.id,
                        "cell": cell.model_dump(),
                        "group": group_id,
                        "victim_accuracy": card.test_accuracy,
                        "metrics": metrics,
                        "alerts": alerts,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    write_json_atomic(out / "cells" / f"{cell.id}.json", record)
                    counts["ok"] += 1
                    if on_cell:
                        on_cell(cell, record)
        except Exception as exc:  # the server itself failed: its remaining cells fail
            for cell in pending:
                if (cell_record(out, cell) or {}).get("status") != "ok":
                    _record_failure(out, cell, exc, counts, on_cell)
    return counts


def _record_failure(out: Path, cell: Cell, exc: BaseException, counts: dict, on_cell) -> None:
    record = {
        "status": "failed",
        "id": cell.id,
        "cell": cell.model_dump(),
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exception(exc)[-5:],
    }
    write_json_atomic(out / "cells" / f"{cell.id}.json", record)
    counts["failed"] += 1
    if on_cell:
        on_cell(cell, record)
