"""Would the provider notice, out of sample? Per-family false alarms and detection delays.

    .venv/bin/python bench/detection.py [--victim var/victims/fashion] [--quick] [--json]
    .venv/bin/python bench/detection.py --throughput     # serving cost of the detectors

Every detector as `mlaas defense train` left it (trained if missing) runs, exactly as the
server runs it, on:

* benign clients: ``--benign-streams`` streams of ``--length`` distinct public-pool images
  (never seen by any detector) per benign-shift family (`mlaas.shifts`);
* Knockoff clients (random sampling): ``--attack-streams`` streams per out-of-distribution
  family, plus the realistic adversary's raw in-domain pool images;
* the same attacks spread over ``--sybil-keys`` keys of one account (round robin, as the
  attacker client's repeated ``--key`` does): each key's share judged alone (level "key")
  and all of them together (level "account").

A family is *held out* when the detectors were neither trained nor calibrated on it (read
from their artifacts). The table gives, per detector, the share of benign streams that
raised a false alarm, and for attacks the median and the worst queries to detection over
the streams ("-" where none alarmed); "set" is the deployment's default detector set, where
a client is flagged when any of them alarms. A PNG shows each detector's trade-off between
false alarms and detection delay as its threshold varies (held-out families only).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from attacker.client import ExtractionClient
from defense.detectors import (
    DEFAULT_DETECTORS,
    DETECTORS,
    artifact_path,
    load_artifact,
    load_detector,
)
from defense.evaluation import (
    Family,
    alarms_below,
    attack_streams,
    benign_streams,
    decision_paths,
    first_alarm,
    tradeoff,
)
from defense.training import forward, train_detectors
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.modelstore import load_card, load_model
from mlaas.plots import tradeoff_plot
from mlaas.shifts import SHIFTS
from testbed.serverproc import ServerProcess

ATTACK_FAMILIES = (
    "natural-crops:photos-a",
    "natural-crops:photos-b",
    "mnist",
    "synthetic:textures",
    "synthetic:noise",
)
IN_DOMAIN = "fashion-mnist:pool"
"""The realistic adversary's queries: in-domain, what no out-of-distribution test can see."""


def families(meta: dict[str, dict], extra: list[str]) -> list[Family]:
    """Every benign and attack family, marked held out unless a detector saw it."""
    calibrated = {s for m in meta.values() for s in m.get("calibration_shifts", [])}
    trained = {m["outliers"] for m in meta.values() if "outliers" in m}
    out = [Family("benign", name, name not in calibrated) for name in SHIFTS]
    attacks = [*ATTACK_FAMILIES, *(e for e in extra if e not in ATTACK_FAMILIES)]
    out += [Family("attack", name, name not in trained) for name in attacks]
    out.append(Family("attack", IN_DOMAIN, True))
    return out


def measure(args: argparse.Namespace) -> dict:
    card = load_card(args.victim)
    defense_dir = args.victim / "defense"
    missing = [d for d in args.detectors if not artifact_path(defense_dir, d).exists()]
    if missing:
        print(f"training {', '.join(missing)}", file=sys.stderr)
        train_detectors(missing, args.victim)
    detectors = [load_detector(name, defense_dir) for name in args.detectors]
    meta = {name: load_artifact(defense_dir, name)[1] for name in args.detectors}
    model, _ = load_model(args.victim)
    shape = card.shape
    pool = load_dataset(f"{card.dataset.split(':')[0]}:pool", shape)
    rng = np.random.default_rng(args.seed)
    results, sybil = [], []
    for family in families(meta, args.attack):
        started = time.perf_counter()
        if family.kind == "benign":
            streams = benign_streams(pool, family.name, args.benign_streams, args.length, rng)
        else:
            source = load_dataset(family.name, shape, seed=args.seed + 1000)  # unseen crops
            streams = attack_streams(source, args.attack_streams, args.length, rng)
        victim = lambda images: forward(model, images)  # noqa: E731
        paths = decision_paths(detectors, victim, streams)
        results.append((family, paths))
        if family.kind == "attack" and args.sybil_keys > 1:
            # Each key's share of every stream; the account's stream is the stream itself.
            shares = [s[k :: args.sybil_keys] for s in streams for k in range(args.sybil_keys)]
            sybil.append((family, paths, decision_paths(detectors, victim, shares)))
        print(
            f"{family.label}: {len(streams)} streams in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    summary = summarise(args, detectors, meta, results)
    summary["sybil"] = summarise_sybil(args, detectors, sybil)
    return summary


def summarise_sybil(args, detectors, sybil) -> list[dict]:
    """Per attack family and detector: how many of the keys were flagged on their own, and
    after how many queries per key the account was (median over the streams)."""
    rows = []
    keys = args.sybil_keys
    for family, account_paths, key_paths in sybil:
        cells = {}
        for detector in detectors:
            threshold, below = detector.threshold, alarms_below(detector)
            alone = first_alarm(key_paths[detector.name], threshold, below)
            together = first_alarm(account_paths[detector.name], threshold, below)
            per_key = np.where(together > 0, np.ceil(together / keys), np.inf)
            cells[detector.name] = {
                "keys_flagged": int((alone > 0).sum()),
                "keys": len(alone),
                "account_flagged": int((together > 0).sum()),
                "accounts": len(together),
                "account_median_per_key": float(np.median(per_key)),
            }
        rows.append({"family": family.label, "held_out": family.held_out, "cells": cells})
    return rows


def render_sybil(summary: dict) -> str:
    if not summary.get("sybil"):
        return ""
    names = list(summary["sybil"][0]["cells"])
    lines = [
        f"| {summary['sybil_keys']} keys, one account | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for row in summary["sybil"]:
        cells = []
        for name in names:
            cell = row["cells"][name]
            median = cell["account_median_per_key"]
            account = "account -" if not np.isfinite(median) else f"account at {median:.0f} per key"
            cells.append(f"{account}; keys alone {cell['keys_flagged']}/{cell['keys']}")
        lines.append(f"| {row['family']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(args, detectors, meta, results) -> dict:
    chosen = [d for d in DEFAULT_DETECTORS if d in {x.name for x in detectors}]
    rows = []
    for family, paths in results:
        row = {"family": family.label, "held_out": family.held_out, "streams": 0, "cells": {}}
        alarms = {}
        for detector in detectors:
            counts = first_alarm(paths[detector.name], detector.threshold, alarms_below(detector))
            alarms[detector.name] = counts
            row["streams"] = len(counts)
            row["cells"][detector.name] = _cell(family, counts)
        if chosen:
            stacked = np.stack([alarms[d] for d in chosen]).astype(float)
            stacked[stacked == 0] = np.inf
            earliest = stacked.min(axis=0)
            row["cells"]["set"] = _cell(family, np.where(np.isfinite(earliest), earliest, 0))
        rows.append(row)
    # Trade-off curves: false alarms over every held-out benign stream, pooled; delays per
    # held-out out-of-distribution family (pooled, a family caught at once would hide one
    # that is never caught).
    held_benign = [p for f, p in results if f.kind == "benign" and f.held_out]
    held_attacks = {
        f.name: p for f, p in results if f.kind == "attack" and f.held_out and f.name != IN_DOMAIN
    }
    curves: dict[str, dict] = {}
    for detector in detectors if held_benign else []:
        benign = np.concatenate([p[detector.name] for p in held_benign])
        curves[detector.name] = {
            "deployed": detector.threshold,
            "families": {
                name: tradeoff(
                    benign,
                    paths[detector.name],
                    alarms_below(detector),
                    include=[detector.threshold],
                )
                for name, paths in held_attacks.items()
            },
        }
    return {
        "victim": str(args.victim),
        "length": args.length,
        "seed": args.seed,
        "sybil_keys": args.sybil_keys,
        "default_set": chosen,
        "calibration_shifts": sorted(
            {s for m in meta.values() for s in m.get("calibration_shifts", [])}
        ),
        "outliers": sorted({m["outliers"] for m in meta.values() if "outliers" in m}),
        "rows": rows,
        "curves": curves,
    }


def _cell(family: Family, counts: np.ndarray) -> dict:
    caught = counts[counts > 0]
    if family.kind == "benign":
        return {"false_alarms": len(caught), "streams": len(counts)}
    return {
        "detected": len(caught),
        "streams": len(counts),
        "median": float(np.median(np.where(counts > 0, counts, np.inf))),
        "worst": float(counts.max()) if len(caught) == len(counts) else float("inf"),
    }


def render(summary: dict) -> str:
    names = list(summary["rows"][0]["cells"]) if summary["rows"] else []
    lines = [
        f"| family | held out | {' | '.join(names)} |",
        "|---|---|" + "---:|" * len(names),
    ]
    for row in summary["rows"]:
        cells = []
        for name in names:
            cell = row["cells"][name]
            if "false_alarms" in cell:
                share = cell["false_alarms"] / max(1, cell["streams"])
                cells.append(f"{cell['false_alarms']}/{cell['streams']} ({share:.0%})")
            elif cell["detected"] == 0:
                cells.append("-")
            elif not np.isfinite(cell["median"]):
                cells.append(f"{cell['detected']}/{cell['streams']} caught")
            else:
                worst = (
                    f"worst {cell['worst']:.0f}"
                    if np.isfinite(cell["worst"])
                    else (f"{cell['detected']}/{cell['streams']} caught")
                )
                cells.append(f"{cell['median']:.0f} ({worst})")
        lines.append(
            f"| {row['family']} | {'yes' if row['held_out'] else 'no'} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """One panel per held-out attack family, a line per detector, a star where deployed."""
    panels: dict[str, dict] = {}
    for detector, data in summary["curves"].items():
        for family, curve in data["families"].items():
            if not curve:
                continue
            deployed = next(p for p in curve if p[0] == data["deployed"])
            panels.setdefault(family, {})[detector] = (
                [p[1] for p in curve],
                [p[2] for p in curve],
                (deployed[1], deployed[2]),
            )
    return tradeoff_plot(
        path,
        panels,
        title=(
            f"Queries to detection vs false alarms, as each threshold varies "
            f"(held-out families, clients of {summary['length']} queries)"
        ),
    )


# ------------------------------------------------------------------------ serving cost
def query_all(url: str, key: str, images: np.ndarray, batch: int) -> float:
    started = time.perf_counter()
    with ExtractionClient(url, key, batch_size=batch, concurrency=4, progress=False) as client:
        client.query(images)
    return len(images) / (time.perf_counter() - started)


def measure_throughput(args: argparse.Namespace) -> None:
    """Rounds alternate between a server without and one with the detectors."""
    token = secrets.token_urlsafe(32)
    card = load_card(args.victim)
    pool = load_dataset(f"{card.dataset.split(':')[0]}:pool", card.shape)
    images = pool.get_batch(np.arange(len(pool)))
    args.out.mkdir(parents=True, exist_ok=True)

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

    rates: dict[str, list[float]] = {"none": [], "all": []}
    with server("plain", []) as plain, server("guarded", args.detectors) as guarded:
        live = {"none": plain, "all": guarded}
        for round_number in range(3):
            for label, process in live.items():
                with AdminClient(process.url, token) as admin:
                    key = admin.create_key(f"load-{round_number}")
                part = images[round_number * 3000 : (round_number + 1) * 3000]
                rates[label].append(query_all(process.url, key, part, batch=64))
    plain_rate, guarded_rate = statistics.median(rates["none"]), statistics.median(rates["all"])
    print(
        f"throughput, 64-image x-npy requests, 3,000 queries per client: no detectors "
        f"{plain_rate:,.0f} img/s, {', '.join(args.detectors)} {guarded_rate:,.0f} img/s, "
        f"ratio {guarded_rate / plain_rate:.2f} (median of 3 alternating rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--out", type=Path, default=Path("var/bench-detection"))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--benign-streams", type=int, default=50)
    parser.add_argument("--attack-streams", type=int, default=20)
    parser.add_argument("--length", type=int, default=1000, help="queries per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sybil-keys", type=int, default=10, help="keys of one account")
    parser.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="SPEC",
        help="another Knockoff transfer set: a registered data set or an ImageFolder path "
        "(repeat for several)",
    )
    parser.add_argument("--quick", action="store_true", help="10 benign, 5 attack streams")
    parser.add_argument("--json", action="store_true", help="end with the summary as JSON")
    parser.add_argument("--throughput", action="store_true", help="serving cost instead")
    args = parser.parse_args()
    args.detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if args.throughput:
        measure_throughput(args)
        return
    if args.quick:
        args.benign_streams, args.attack_streams = 10, 5
    summary = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.json").write_text(json.dumps(summary, indent=1))
    figure = plot(summary, args.out / "tradeoff.png") if summary["curves"] else None
    print(
        f"\nvictim {summary['victim']}; calibrated on {', '.join(summary['calibration_shifts'])}; "
        f"outliers {', '.join(summary['outliers'])}; {summary['length']} queries per client; "
        f"default set: {', '.join(summary['default_set'])}\n"
    )
    print(render(summary))
    if summary["sybil"]:
        print(f"\nthe same attacks over {args.sybil_keys} keys of one account:\n")
        print(render_sybil(summary))
    if figure:
        print(f"\ntrade-off curves: {figure}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
