"""Running an experiment matrix, resumably, each cell against a real server over HTTP.

``OUT/config.yaml``            the configuration as run
``OUT/victims/NAME-sSEED/``    trained victims (and their detectors), reused across runs,
                               unless a victim names a directory of its own
``OUT/cells/ID.json``          one record per cell: ``ok`` with its metrics, or ``failed``
``OUT/groups/ID.json``         per server group: benign clients' accuracy and false alarms
``OUT/servers/ID.db``, ``.log`` per server group: the query log and the server's output
``OUT/runs/NAME/``             each attack's run directory (cache, curve, substitute), named
                               by the configuration's ``run_name`` (default: the cell's id)

One after another (the default), cells sharing a victim, defense and seed share one
``mlaas serve`` process: the benign clients query it first, then each cell's attacker under
an API key of its own, whose granularity is the cell's. Side by side (``side_by_side``), a
group is one victim, defense, granularity and seed: its attackers and benign clients query
one server at once, each under a key named after it. A rerun skips cells whose record says
``ok``; a failing cell is recorded and the others go on.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.modelstore import ModelCard, write_json_atomic
from testbed.benign import benign_images, run_benign_client
from testbed.experiments.config import Cell, DefenseSpec, ExperimentConfig
from testbed.experiments.observe import settle, standing, watch
from testbed.experiments.victims import ensure_detectors, ensure_victim
from testbed.serverproc import ServerProcess

OnCell = Callable[[Cell, dict[str, Any]], None]


def cell_record(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = out / "cells" / f"{cell.id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _server(
    victim_dir: Path, defense: DefenseSpec, database: Path, token: str, log: Path
) -> ServerProcess:
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


@dataclass
class _BenignClient:
    name: str
    shift: str
    images: np.ndarray
    labels: np.ndarray


def _benign_clients(config: ExperimentConfig, card: ModelCard, seed: int) -> list[_BenignClient]:
    """Honest users: public in-domain images under the configuration's benign shifts."""
    dataset = card.dataset.split(":")[0]
    try:
        pool = load_dataset(f"{dataset}:pool", card.shape)
    except ValueError:
        pool = load_dataset(f"{dataset}:test", card.shape)
    clients = []
    for index in range(config.benign.clients):
        rng = np.random.default_rng([seed, index])
        shift = config.benign.shifts[index % len(config.benign.shifts)]
        images, labels = benign_images(pool, config.benign.queries, rng, shift)
        clients.append(_BenignClient(f"benign-{index + 1}", shift, images, labels))
    return clients


def _run_benign(url: str, key: str, client: _BenignClient) -> dict[str, Any]:
    result = run_benign_client(url, key, client.images, client.labels)
    return {
        "client": client.name,
        "shift": client.shift,
        "queries": result.queries,
        "accuracy": result.accuracy,
    }


def _benign_summary(admin: AdminClient, clients: list[dict[str, Any]]) -> dict[str, Any]:
    """The benign clients with the provider's account of them: their accuracy through the API,
    and whether any detector alarmed."""
    for client in clients:
        client.update(standing(admin, client["client"]))
    measured = [c["accuracy"] for c in clients if c["accuracy"] is not None]
    return {
        "clients": clients,
        "accuracy": float(np.mean(measured)) if measured else None,
        "false_alarm_rate": float(np.mean([bool(c["alerts"]) for c in clients]))
        if clients
        else None,
    }


def attack_config(cell: Cell, config: ExperimentConfig):
    """The cell's attack, as the attacker CLI would configure it."""
    from attacker.config import for_attack

    options = cell.attacker.attack_options()
    # "{dataset}" stands for the victim's data set
    options["transfer"] = options["transfer"].format(dataset=cell.victim.dataset)
    return for_attack(
        cell.attacker.attack, **options, test_set=cell.victim.evaluation_set,
        eval_size=config.eval_size, seed=cell.seed, device=config.device,
    )  # fmt: skip


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
    # Validated as the server validates its environment: from the configuration's strings.
    ServerSettings.model_validate(
        {
            "detectors": ",".join(cell.defense.detectors),
            "policy": cell.defense.policy,
            "perturbation": cell.defense.perturbation,
            "granularity": cell.granularity,
            **({"deceive": cell.defense.deceive} if cell.defense.deceive else {}),
        }
    )


def _attack(
    url: str, key: str, cell: Cell, config: ExperimentConfig, out: Path, experimenter: str
) -> dict[str, Any]:
    from attacker.runner import run_attack

    attack = attack_config(cell, config)
    run_dir = out / "runs" / config.run_dir(cell)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished cell starts over: its client is new
    return run_attack(
        attack, url=url, keys=[key], out=run_dir, eval_key=experimenter, progress=False,
        console=Console(file=io.StringIO()),
    )  # fmt: skip


@dataclass
class _Group:
    """The cells of one server group still to run, and what they share."""

    id: str
    cells: list[Cell]
    card: ModelCard
    out: Path
    config: ExperimentConfig

    def ok_record(
        self, cell: Cell, metrics: dict[str, Any], seen: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        return {
            "status": "ok",
            "id": cell.id,
            "cell": cell.model_dump(),
            "group": self.id,
            "victim_accuracy": self.card.test_accuracy,
            "metrics": metrics,
            **seen,  # the provider's account: queries logged, alerts
            "run_dir": f"runs/{self.config.run_dir(cell)}",
            "seconds": round(seconds, 1),
        }


class _Records:
    """Writes the cell records and counts them."""

    def __init__(self, out: Path, counts: dict[str, int], on_cell: OnCell | None) -> None:
        self.out = out
        self.counts = counts
        self.on_cell = on_cell

    def write(self, cell: Cell, record: dict[str, Any]) -> None:
        write_json_atomic(self.out / "cells" / f"{cell.id}.json", record)
        self.counts[record["status"]] += 1
        if self.on_cell:
            self.on_cell(cell, record)

    def failed(self, cell: Cell, group: str, exc: BaseException, **seen: Any) -> None:
        self.write(
            cell,
            {
                "status": "failed",
                "id": cell.id,
                "cell": cell.model_dump(),
                "group": group,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exception(exc)[-5:],
                **seen,
            },
        )

    def done(self, cell: Cell) -> bool:
        return (cell_record(self.out, cell) or {}).get("status") == "ok"


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    console: Console | None = None,
    config_text: str | None = None,
    on_cell: OnCell | None = None,
) -> dict[str, int]:
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_text or config.dump())
    groups = config.groups()
    counts = {"cells": sum(len(cells) for _, cells in groups), "skipped": 0, "ok": 0, "failed": 0}
    records = _Records(out, counts, on_cell)
    for group_id, members in groups:
        pending = [c for c in members if not records.done(c)]
        counts["skipped"] += len(members) - len(pending)
        if pending:
            console.print(f"[bold]{group_id}[/]: {len(pending)} cells to run")
            _run_group(config, out, group_id, pending, console, records)
    return counts


def _run_group(
    config: ExperimentConfig,
    out: Path,
    group_id: str,
    pending: list[Cell],
    console: Console,
    records: _Records,
) -> None:
    first = pending[0]
    try:
        victim_dir, card = ensure_victim(out, first.victim, first.seed, config.device, console)
        if first.defense.detectors:
            ensure_detectors(victim_dir, first.defense.detectors, console)
    except Exception as exc:  # the whole group cannot run without its victim
        for cell in pending:
            records.failed(cell, group_id, exc)
        return
    group = _Group(group_id, pending, card, out, config)
    token = secrets.token_urlsafe(32)
    database = out / "servers" / f"{group_id}.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    database.unlink(missing_ok=True)
    server = _server(victim_dir, first.defense, database, token, database.with_suffix(".log"))
    detectors = ", ".join(first.defense.detectors) or "none"
    try:
        with server, AdminClient(server.url, token) as admin:
            console.print(
                f"[bold]serving[/] {card.name} on {server.url}, detectors: {detectors} "
                f"(log: {server.log_file})"
            )
            experimenter = admin.create_key("experimenter")
            if not config.side_by_side:
                _one_by_one(server.url, admin, experimenter, group, records, console)
                return
            started = time.perf_counter()
            record = {**_group_record(group), "side_by_side": True}
            benign = _side_by_side(server.url, admin, experimenter, group, records, console)
            record["benign"] = benign
            record["experimenter_queries"] = admin.client("experimenter")["queries_logged"]
        # Written once the server has stopped: how it ended belongs to the record.
        record.update(_server_account(server, database))
        record["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out / "groups" / f"{group_id}.json", record)
    except Exception as exc:  # the server itself failed: its remaining cells fail
        for cell in pending:
            if not records.done(cell):
                records.failed(cell, group_id, exc)


def _group_record(group: _Group) -> dict[str, Any]:
    first = group.cells[0]
    return {
        "group": group.id,
        "seed": first.seed,
        "victim": group.card.model_dump(mode="json"),
        "defense": first.defense.model_dump(),
    }


def _server_account(server: ServerProcess, database: Path) -> dict[str, Any]:
    """How the server process ended, and the rows its query log holds."""
    from server.db import make_engine
    from server.querylog import count_queries

    return {
        "server_exit_code": server.stop(),
        "log_rows": count_queries(make_engine(f"sqlite:///{database}")),
    }


def _one_by_one(
    url: str,
    admin: AdminClient,
    experimenter: str,
    group: _Group,
    records: _Records,
    console: Console,
) -> None:
    """The benign clients (once per group: a resumed group keeps its record), then each
    cell's attacker in turn."""
    group_path = group.out / "groups" / f"{group.id}.json"
    if not group_path.exists():
        clients = _benign_clients(group.config, group.card, group.cells[0].seed)
        results = [_run_benign(url, admin.create_key(c.name), c) for c in clients]
        settle(admin)
        write_json_atomic(
            group_path, {**_group_record(group), "benign": _benign_summary(admin, results)}
        )
    for cell in group.cells:
        started = time.perf_counter()
        console.print(f"  {cell.id}")
        # Unique in the log: a cell that runs again is a new client, unknown to the monitor.
        key_name = f"attacker-{cell.id[-8:]}-{secrets.token_hex(3)}"
        try:
            key = admin.create_key(key_name, cell.granularity)
            metrics = _attack(url, key, cell, group.config, group.out, experimenter)
            settle(admin)
            seen = standing(admin, key_name)
        except Exception as exc:
            records.failed(cell, group.id, exc)
            continue
        records.write(cell, group.ok_record(cell, metrics, seen, time.perf_counter() - started))


class _Client(threading.Thread):
    """One client's traffic in a thread of its own; what it returned or raised is kept."""

    def __init__(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self._outcome: dict[str, Any] | Exception | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._outcome = self._work()
        except Exception as exc:  # one failing client must not sink the others
            self._outcome = exc
        self.seconds = time.perf_counter() - started

    def outcome(self) -> dict[str, Any]:
        """What the work returned, once the thread has ended; raises what it raised."""
        if isinstance(self._outcome, dict):
            return self._outcome
        raise self._outcome or RuntimeError(f"client {self.name} did not run")


def _side_by_side(
    url: str,
    admin: AdminClient,
    experimenter: str,
    group: _Group,
    records: _Records,
    console: Console,
) -> dict[str, Any]:
    """The benign clients and every attacker of the group at once, each under a key named
    after it; returns the benign clients' summary."""
    benign = _benign_clients(group.config, group.card, group.cells[0].seed)
    honest = [
        _Client(c.name, partial(_run_benign, url, admin.create_key(c.name), c)) for c in benign
    ]
    attackers = [
        _Client(
            cell.attacker.name,
            partial(
                _attack,
                url,
                admin.create_key(cell.attacker.name, cell.granularity),
                cell,
                group.config,
                group.out,
                experimenter,
            ),
        )
        for cell in group.cells
    ]
    totals = {c.name: len(c.images) for c in benign}
    totals |= {cell.attacker.name: cell.attacker.budget for cell in group.cells}
    for client in [*honest, *attackers]:
        client.start()
    watch(admin, [*honest, *attackers], totals, console)  # returns with the log settled
    for cell, client in zip(group.cells, attackers, strict=True):
        seen = standing(admin, cell.attacker.name)
        try:
            metrics = client.outcome()
        except Exception as exc:
            records.failed(cell, group.id, exc, **seen)
            continue
        records.write(cell, group.ok_record(cell, metrics, seen, client.seconds))
    results = []
    for user, client in zip(benign, honest, strict=True):
        try:
            results.append(client.outcome())
        except Exception as exc:
            results.append({"client": user.name, "shift": user.shift, "queries": 0,
                            "accuracy": None, "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
    return _benign_summary(admin, results)
