"""The defense's figures: who gets caught, after how many queries, and what it costs.

    .venv/bin/python bench/detection.py [--victim var/victims/fashion] [--benign 20] [--quick]

Against the default victim served with all four detectors (``ood-binary``, ``msp``,
``mahalanobis``, ``prada``; policy ``monitor``), each client under its own key:

* a Knockoff nets client sending natural crops;
* benign clients, each sending 1,000 public-pool images with mild natural variations;
* the realistic adversary's 5,000 in-domain queries;
* a JBDA adversary (the real attack, its substitute trained between rounds);

then prints, per client and detector, the query count at the first alert or "-", and the
serving throughput with all detectors on against none (ratio measured in one run, rounds
alternating between two server processes).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from attacker.attacks import AttackConfig
from attacker.client import ExtractionClient
from attacker.runner import run_attack
from defense.detectors import artifact_path
from defense.training import train_detectors
from mlaas.apiclient import AdminClient
from mlaas.benign import benign_images, run_benign_client
from mlaas.datasets import load_dataset
from mlaas.modelstore import load_card
from mlaas.serverproc import ServerProcess

DETECTORS = ["ood-binary", "msp", "mahalanobis", "prada"]


def query_all(url: str, key: str, images: np.ndarray, batch: int) -> None:
    with ExtractionClient(url, key, batch_size=batch, concurrency=1, progress=False) as client:
        client.query(images)


def first_alerts(admin: AdminClient, client: str) -> dict[str, int]:
    """Per detector, the client's query count at its first alert (once the log caught up)."""
    deadline = time.monotonic() + 30
    standing = admin.client(client)
    while standing["queries_logged"] < standing["monitor"]["queries"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        standing = admin.client(client)
    time.sleep(0.3)  # alerts travel in the same writer batches as their query rows
    return {a["detector"]: a["query_count"] for a in admin.client(client)["alerts"]}


def throughput(url: str, key: str, images: np.ndarray) -> float:
    started = time.perf_counter()
    with ExtractionClient(url, key, batch_size=64, concurrency=4, progress=False) as client:
        client.query(images)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--out", type=Path, default=Path("var/bench-defense"))
    parser.add_argument("--benign", type=int, default=20)
    parser.add_argument("--benign-queries", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="fewer clients and queries")
    parser.add_argument("--throughput-only", action="store_true", help="skip the detection part")
    args = parser.parse_args()
    if args.quick:
        args.benign, args.benign_queries = 4, 300
    card = load_card(args.victim)
    defense_dir = args.victim / "defense"
    missing = [d for d in DETECTORS if d != "prada" and not artifact_path(defense_dir, d).exists()]
    if missing:
        print(f"training {', '.join(missing)}", file=sys.stderr)
        train_detectors(missing, args.victim)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = card.shape
    pool = load_dataset("fashion-mnist:pool", shape)
    crops = load_dataset("natural-crops", shape)
    token = secrets.token_urlsafe(16)

    def server(name: str, detectors: list[str]) -> ServerProcess:
        database = args.out / f"{name}.db"
        database.unlink(missing_ok=True)
        return ServerProcess(
            args.victim,
            env={
                "MLAAS_DATABASE_URL": f"sqlite:///{database}",
                "MLAAS_ADMIN_TOKEN": token,
                "MLAAS_DETECTORS": ",".join(detectors),
                "MLAAS_POLICY": "monitor",
            },
            log_file=args.out / f"{name}.log",
        )

    if not args.throughput_only:
        detection(args, server, pool, crops, token)
    measure_throughput(server, pool, token)


def detection(args, server, pool, crops, token: str) -> None:
    rows: list[tuple[str, int, dict[str, int]]] = []
    with server("detect", DETECTORS) as live, AdminClient(live.url, token) as admin:
        knockoff = admin.create_key("knockoff")
        query_all(live.url, knockoff, crops.get_batch(np.arange(300)), batch=10)
        rows.append(("knockoff (natural crops)", 300, first_alerts(admin, "knockoff")))

        rng = np.random.default_rng(0)
        false_alarms: dict[str, int] = {}
        for i in range(args.benign):
            name = f"benign-{i + 1}"
            key = admin.create_key(name)
            images, labels = benign_images(pool, args.benign_queries, rng)
            run_benign_client(live.url, key, images, labels)
            for detector, count in first_alerts(admin, name).items():
                false_alarms[detector] = false_alarms.get(detector, 0) + 1
                print(f"{name}: false alarm by {detector} at query {count}", file=sys.stderr)
        rows.append(
            (f"{args.benign} benign x {args.benign_queries} (clients alerted)", args.benign *
             args.benign_queries, false_alarms)
        )  # fmt: skip

        realistic = admin.create_key("realistic")
        order = np.random.default_rng(1).permutation(len(pool))[:5000]
        query_all(live.url, realistic, pool.get_batch(order), batch=64)
        rows.append(("realistic (in-domain pool)", 5000, first_alerts(admin, "realistic")))

        jbda = admin.create_key("jbda")
        config = AttackConfig.for_attack("jbda", budget=5000, epochs=10, eval_size=1000)
        run_attack(config, url=live.url, keys=[jbda], out=args.out / "jbda-run", progress=False)
        rows.append(("jbda (seed 150, lambda 0.1)", 5000, first_alerts(admin, "jbda")))

    print("\n| client | queries | " + " | ".join(DETECTORS) + " |")
    print("|---|---:|" + "---:|" * len(DETECTORS))
    for name, queries, alerts in rows:
        cells = [str(alerts[d]) if d in alerts else "-" for d in DETECTORS]
        print(f"| {name} | {queries:,} | " + " | ".join(cells) + " |")


def measure_throughput(server, pool, token: str) -> None:
    """Rounds alternate between a server without and one with all four detectors."""
    rates: dict[str, list[float]] = {"none": [], "all": []}
    images = pool.get_batch(np.arange(len(pool)))
    with server("plain", []) as plain, server("guarded", DETECTORS) as guarded:
        admins = {"none": AdminClient(plain.url, token), "all": AdminClient(guarded.url, token)}
        urls = {"none": plain.url, "all": guarded.url}
        for round_number in range(3):
            for label in ("none", "all"):
                key = admins[label].create_key(f"load-{round_number}")
                part = images[round_number * 3000 : (round_number + 1) * 3000]
                rates[label].append(throughput(urls[label], key, part))
        for admin in admins.values():
            admin.close()
    plain_rate, guarded_rate = statistics.median(rates["none"]), statistics.median(rates["all"])
    print(
        f"\nthroughput, 64-image x-npy requests, 3,000 queries per client: no detectors "
        f"{plain_rate:,.0f} img/s, all four {guarded_rate:,.0f} img/s, "
        f"ratio {guarded_rate / plain_rate:.2f} (median of 3 alternating rounds)"
    )


if __name__ == "__main__":
    main()
