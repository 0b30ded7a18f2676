"""The attacker's figures: every attack against the default victim, probabilities vs labels.

    .venv/bin/python bench/attack_table.py [--budget 5000] [--attacks ...] [--out var/attack-table]

Serves ``var/victims/fashion`` (training it if missing) with a fresh SQLite log, gives each
attack its own key (label-only runs get a key whose granularity is ``label``) and an
experimenter key for fidelity, runs the attacks one after another, and prints a Markdown
table. Run directories are kept under ``--out``: a rerun resumes finished and unfinished
attacks from their caches without buying a query twice.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

from attacker.config import for_attack
from attacker.runner import run_attack
from mlaas.apiclient import AdminClient
from testbed.serverproc import ServerProcess
from testbed.victim import train_victim

# (row name, attack, granularity, overrides)
PLAN = [
    ("knockoff random", "knockoff", "probs", {"strategy": "random"}),
    ("knockoff adaptive", "knockoff", "probs", {"strategy": "adaptive"}),
    ("realistic", "realistic", "probs", {}),
    ("copycat", "copycat", "probs", {}),
    ("jbda", "jbda", "probs", {}),
    ("knockoff random", "knockoff", "label", {"strategy": "random"}),
    ("knockoff adaptive", "knockoff", "label", {"strategy": "adaptive"}),
    ("realistic", "realistic", "label", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--out", type=Path, default=Path("var/attack-table"))
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--only", nargs="*", help="row names to run, e.g. 'realistic'")
    args = parser.parse_args()

    if not (args.victim / "card.json").exists():
        train_victim(args.victim)
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    server = ServerProcess(
        args.victim,
        env={
            "MLAAS_DATABASE_URL": f"sqlite:///{args.out / 'mlaas.db'}",
            "MLAAS_ADMIN_TOKEN": token,
        },
        log_file=args.out / "server.log",
    )
    keys_file = args.out / "keys.json"
    rows = []
    with server, AdminClient(server.url, token) as admin:
        keys = json.loads(keys_file.read_text()) if keys_file.exists() else {}

        def key_for(name: str, granularity: str | None = None) -> str:
            if name not in keys:
                keys[name] = admin.create_key(name, granularity)
                keys_file.write_text(json.dumps(keys))
            return keys[name]

        experimenter = key_for("experimenter")
        for row, attack, granularity, overrides in PLAN:
            if args.only and row not in args.only:
                continue
            slug = f"{row.replace(' ', '-')}-{granularity}"
            config = for_attack(attack, budget=args.budget, **overrides)
            started = time.perf_counter()
            metrics = run_attack(
                config,
                url=server.url,
                keys=[key_for(slug, None if granularity == "probs" else granularity)],
                out=args.out / slug,
                eval_key=experimenter,
            )
            final = metrics["final"]
            rows.append(
                (row, granularity, final["queries"], final["accuracy"], final["fidelity"],
                 metrics["victim_test_accuracy"], time.perf_counter() - started)
            )  # fmt: skip

    print("\n| attack | API answers | queries | accuracy | of victim | fidelity |")
    print("|---|---|---:|---:|---:|---:|")
    for row, granularity, queries, accuracy, fidelity, victim, _ in rows:
        print(
            f"| {row} | {granularity} | {queries:,} | {accuracy:.1%} | {accuracy / victim:.2f} "
            f"| {fidelity:.1%} |"
        )
    print(f"\nvictim test accuracy {rows[0][5]:.1%}" if rows else "")


if __name__ == "__main__":
    main()
