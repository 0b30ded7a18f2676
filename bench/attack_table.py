"""The attacker's figures: every attack against the default victim, probabilities vs labels.

    .venv/bin/python -m bench.attack_table [--budget 5000] [--seeds 0,1,2] [--only ...]
        [--epochs N] [--out var/attack-table]

Serves ``var/victims/fashion`` (training it if missing) with a fresh SQLite log, runs every
row once per seed, each run under its own key (label-only runs get a key whose granularity
is ``label``) with an experimenter key for fidelity, one after another, and prints a
Markdown table: accuracy and fidelity as mean ± sample std over the seeds, and the per-seed
fidelities. ``--epochs`` overrides every attack's own epochs (for smoke runs). Run
directories are kept under ``--out``: a rerun resumes finished and unfinished runs from
their caches without buying a query twice.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from attacker.config import for_attack
from attacker.runner import run_attack
from bench.common import KeyBook, attack_bench_server, int_list, percent, spread
from mlaas.apiclient import AdminClient

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
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="every attack's epochs (default: its own)")
    parser.add_argument("--only", nargs="*", help="row names to run, e.g. 'realistic'")
    args = parser.parse_args()

    server, token = attack_bench_server(args.victim, args.out)
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    rows = []
    with server, AdminClient(server.url, token) as admin:
        key_for = KeyBook(args.out / "keys.json", admin).key
        experimenter = key_for("experimenter")
        for row, attack, granularity, overrides in PLAN:
            if args.only and row not in args.only:
                continue
            finals = []
            for seed in args.seeds:
                slug = f"{row.replace(' ', '-')}-{granularity}-s{seed}"
                config = for_attack(attack, budget=args.budget, seed=seed, **epochs, **overrides)
                metrics = run_attack(
                    config,
                    url=server.url,
                    keys=[key_for(slug, None if granularity == "probs" else granularity)],
                    out=args.out / slug,
                    eval_key=experimenter,
                )
                finals.append(metrics["final"])
            rows.append((row, granularity, finals, metrics["victim_test_accuracy"]))

    print("\n| attack | API answers | queries | accuracy | of victim | fidelity | per seed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row, granularity, finals, victim_accuracy in rows:
        accuracy = [f["accuracy"] for f in finals]
        fidelity = [f["fidelity"] for f in finals]
        queries = sorted({f["queries"] for f in finals})
        print(
            f"| {row} | {granularity} | {' / '.join(f'{q:,}' for q in queries)} "
            f"| {percent(spread(accuracy))} | {statistics.fmean(accuracy) / victim_accuracy:.2f} "
            f"| {percent(spread(fidelity))} | {' / '.join(f'{v:.1%}' for v in fidelity)} |"
        )
    if rows:
        seeds = ", ".join(map(str, args.seeds))
        print(f"\nvictim test accuracy {rows[0][3]:.1%}; mean ± sample std over seeds {seeds}")


if __name__ == "__main__":
    main()
