"""Our Knockoff nets against IBM ART's KnockoffNets, side by side on one server.

    .venv/bin/python -m bench.peer [--victim var/victims/fashion] [--out var/peer]
        [--budgets 1000,5000] [--seeds 0,1,2] [--transfers natural-crops,fashion-mnist:pool]
        [--variants default,random] [--epochs 30] [--json]

Serves ``--victim`` (trained if missing) with a fresh SQLite log under ``--out`` for the whole
run. For every transfer set x budget x seed it steals the victim once per method, each
under its own key and with its own budget:

* our variants through :func:`attacker.runner.run_attack`: ``default`` is the knockoff attack
  with its defaults (budget, transfer set, seed and epochs aside), ``random`` the same with
  ``strategy="random"``, the paper's Knockoff nets;
* ART's ``KnockoffNets`` (``sampling_strategy="random"``, ``use_probability=True``) through a
  ``BlackBoxClassifier`` that posts to ``/v1/predict``, training ART's ``PyTorchClassifier``
  around the architecture ours uses, with Adam at lr 1e-3 and plain cross-entropy. It is
  given exactly the images our random strategy queries for that seed, so both random
  samplers see the same images and differ only in how they train on the answers.

Accuracy and fidelity of every copy are measured alike, on the attack's test set against the
victim's labels from an experimenter key. Prints a Markdown table (one row per transfer set x
budget: mean ± sample std over the seeds, the per-seed fidelities, and each variant's
difference from ART paired by seed) and writes ``--out/peer.json`` and ``--out/peer.png``.
A rerun resumes: answers come from each cell's cache (no query is bought twice) and finished
ART cells are read back from ``result.json``.

What is held out is up to the command line: the transfer sets and seeds are its arguments.
The defaults are the sets the attack is developed on; pass ``natural-crops:photos-b`` or any
``imagefolder:PATH`` (and other seeds) to compare on held-out transfer sets.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from art.attacks.extraction import KnockoffNets
from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
from matplotlib.figure import Figure
from rich.console import Console

from attacker.attacks import Victim, open_transfer, random_order
from attacker.client import ExtractionClient
from attacker.config import AttackConfig, BaseAttackConfig, for_attack
from attacker.evaluation import Evaluator, make_evaluator
from attacker.runner import ConfigMismatch, run_attack
from bench.common import KeyBook, attack_bench_server, int_list, percent, spread
from mlaas.apiclient import AdminClient
from mlaas.images import InputShape, to_tensor
from mlaas.models import build_model
from mlaas.modelstore import write_json_atomic

VARIANTS: dict[str, dict[str, Any]] = {"default": {}, "random": {"strategy": "random"}}
"""Our variants: options on top of budget, transfer set, seed and epochs."""
ART = "ART"
ART_LR = 1e-3  # torch.optim.Adam's own default, the one ART's examples train with
QUERY_CHUNK = 1000  # images per predict call from ART: the API client batches them further

console = Console(stderr=True, soft_wrap=True)  # one line per cell, however narrow


def main() -> None:
    args = parse_args()
    server, token = attack_bench_server(args.victim, args.out)
    cells: list[dict[str, Any]] = []
    with server, AdminClient(server.url, token) as admin:
        keys = KeyBook(args.out / "keys.json", admin)
        experimenter = keys.key("experimenter")
        with ExtractionClient(
            server.url, experimenter, cache_path=args.out / "eval-cache.sqlite", progress=False
        ) as eval_client:
            info = eval_client.model_info()
            victim = Victim(InputShape.parse(info.input_shape), len(info.classes))
            test_config = for_attack("knockoff")
            evaluator = make_evaluator(
                test_config.test_set,
                victim.shape,
                size=test_config.eval_size,
                eval_client=eval_client,
            )
        for transfer in args.transfers:
            for budget in args.budgets:
                for seed in args.seeds:
                    cell_dir = args.out / slug(transfer) / str(budget) / str(seed)
                    cell = {"transfer": transfer, "budget": budget, "seed": seed}
                    for variant in args.variants:
                        # Measured at the budget only, as ART's copy is.
                        config = for_attack(
                            "knockoff", budget=budget, transfer=transfer, seed=seed,
                            epochs=args.epochs, checkpoints=[], **VARIANTS[variant],
                        )  # fmt: skip
                        name = f"{variant}-{slug(transfer)}-{budget}-s{seed}"
                        cells.append(
                            {**cell, "method": variant, **run_ours(
                                config, server.url, keys.key(name), experimenter,
                                cell_dir / variant,
                            )}
                        )  # fmt: skip
                        report_cell(cells[-1])
                    art_config = for_attack(
                        "knockoff", budget=budget, transfer=transfer, seed=seed,
                        epochs=args.epochs, strategy="random",
                    )  # fmt: skip
                    art_key = keys.key(f"art-{slug(transfer)}-{budget}-s{seed}")
                    result = run_art(
                        art_config, server.url, art_key, victim, evaluator, cell_dir / "art"
                    )
                    cells.append({**cell, "method": ART, **result})
                    report_cell(cells[-1])

    methods = [*args.variants, ART]
    summary = summarise(cells, methods, args.variants)
    outcome = {
        "victim": args.victim.as_posix(),
        "victim_test_accuracy": evaluator.victim_accuracy,
        "epochs": args.epochs,
        "methods": methods,
        "cells": cells,
        "summary": summary,
    }
    write_json_atomic(args.out / "peer.json", outcome)
    plot(args.out / "peer.png", summary, methods)
    print(markdown_table(summary, methods, args.variants))
    print(
        f"\nvictim test accuracy {evaluator.victim_accuracy:.1%}; mean ± sample std over seeds "
        f"{', '.join(map(str, args.seeds))}; {args.epochs} epochs; queries bought this run: "
        f"{sum(c['queries_sent_this_run'] for c in cells):,}"
    )
    if args.json:
        print(json.dumps(outcome))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--out", type=Path, default=Path("var/peer"))
    parser.add_argument("--budgets", type=int_list, default=[1000, 5000])
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    parser.add_argument(
        "--transfers", type=name_list, default=["natural-crops", "fashion-mnist:pool"]
    )
    parser.add_argument("--variants", type=name_list, default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of it all")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def slug(transfer: str) -> str:
    """A directory and key name for a transfer set spec (``fashion-mnist:pool`` and
    ``imagefolder:/data/x`` included)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", transfer).strip("-")


def run_ours(
    config: AttackConfig, url: str, key: str, experimenter: str, run_dir: Path
) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = finished_run(config, run_dir) or run_attack(
        config, url=url, keys=[key], out=run_dir, eval_key=experimenter
    )
    final = metrics["final"]
    return {
        "accuracy": final["accuracy"],
        "fidelity": final["fidelity"],
        "queries_spent": metrics["queries_spent"],
        "queries_sent_this_run": metrics["queries_sent_this_run"],
        "seconds": round(time.perf_counter() - started, 1),
        "dir": run_dir.as_posix(),
    }


def finished_run(config: AttackConfig, run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run this configuration already finished in ``run_dir``: a rerun of the
    bench then reports it instead of training its substitute again."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        return None
    same = all(recorded.get(k) == v for k, v in config.to_dict().items())
    if not same or "final" not in metrics:
        return None
    return {**metrics, "queries_sent_this_run": 0}


def run_art(
    config: BaseAttackConfig,
    url: str,
    key: str,
    victim: Victim,
    evaluator: Evaluator,
    cell_dir: Path,
) -> dict[str, Any]:
    """ART's KnockoffNets on the images our random strategy queries for ``config.seed``;
    read back from ``result.json`` when this cell has finished before."""
    settings = {
        "transfer": config.transfer,
        "budget": config.budget,
        "seed": config.seed,
        "epochs": config.epochs,
        "arch": config.arch,
        "batch_size_fit": config.train_batch_size,
        "lr": ART_LR,
    }
    result_file = cell_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        changed = sorted(k for k, v in settings.items() if result["settings"].get(k) != v)
        if changed:
            raise ConfigMismatch(
                f"{cell_dir} holds an ART run with other settings ({', '.join(changed)}); "
                "use another --out, or the same options to resume it"
            )
        return {**result["outcome"], "queries_sent_this_run": 0}

    started = time.perf_counter()
    transfer = open_transfer(config, victim)
    # The images our random strategy queries (it sends no cover here), in its order.
    order = random_order(config, transfer)[: config.budget]
    images = to_tensor(transfer.get_batch(order)).numpy()
    shape = (victim.shape.channels, victim.shape.height, victim.shape.width)

    torch.manual_seed(config.seed)
    model = build_model(config.arch, victim.num_classes, victim.shape)
    thief = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=ART_LR),
        input_shape=shape,
        nb_classes=victim.num_classes,
        clip_values=(0.0, 1.0),
    )
    with ExtractionClient(
        url, key, budget=config.budget, cache_path=cell_dir / "cache.sqlite", seed=config.seed
    ) as client:
        api = BlackBoxClassifier(
            predict_fn=api_predict(client),
            input_shape=shape,
            nb_classes=victim.num_classes,
            clip_values=(0.0, 1.0),
        )
        attack = KnockoffNets(
            classifier=api,
            batch_size_fit=config.train_batch_size,
            batch_size_query=QUERY_CHUNK,
            nb_epochs=config.epochs,
            nb_stolen=config.budget,
            sampling_strategy="random",
            use_probability=True,
            verbose=False,
        )
        np.random.seed(config.seed)  # ART draws its sample of x from numpy's global generator
        attack.extract(images, thieved_classifier=thief)
        queries_spent, sent = client.spent, client.sent_images
    outcome = {
        **evaluator.evaluate(model),
        "queries_spent": queries_spent,
        "seconds": round(time.perf_counter() - started, 1),
        "dir": cell_dir.as_posix(),
    }
    write_json_atomic(result_file, {"settings": settings, "outcome": outcome})
    return {**outcome, "queries_sent_this_run": sent}


def api_predict(client: ExtractionClient) -> Callable[[np.ndarray], np.ndarray]:
    """ART's predict function: its float NCHW batch in [0, 1] back to the uint8 pixels it came
    from, sent through ``client``; the API's probability vectors come back."""

    def predict(x: np.ndarray) -> np.ndarray:
        pixels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return client.query(pixels).probs

    return predict


def report_cell(cell: dict[str, Any]) -> None:
    console.print(
        f"[bold]{cell['transfer']} · {cell['budget']:,} · seed {cell['seed']} · "
        f"{cell['method']}[/]: fidelity {cell['fidelity']:.2%}, accuracy {cell['accuracy']:.2%}"
        f" ({cell['queries_sent_this_run']:,} queries bought this run, {cell['seconds']:.0f} s)"
    )


def summarise(
    cells: list[dict[str, Any]], methods: list[str], variants: list[str]
) -> list[dict[str, Any]]:
    """Per transfer set x budget: each method's fidelity and accuracy over the seeds, and each
    variant minus ART, paired by seed."""
    rows = []
    for transfer, budget in dict.fromkeys((c["transfer"], c["budget"]) for c in cells):
        mine = [c for c in cells if (c["transfer"], c["budget"]) == (transfer, budget)]
        by_method = {m: sorted((c for c in mine if c["method"] == m), key=seed_of) for m in methods}
        art = {c["seed"]: c["fidelity"] for c in by_method[ART]}
        differences = {}
        for variant in variants:
            paired = [c["fidelity"] - art[c["seed"]] for c in by_method[variant]]
            differences[variant] = {"mean": statistics.fmean(paired), "min": min(paired),
                                    "max": max(paired), "per_seed": paired}  # fmt: skip
        rows.append(
            {
                "transfer": transfer,
                "budget": budget,
                "seeds": [c["seed"] for c in by_method[ART]],
                "methods": {
                    m: {
                        "fidelity": spread([c["fidelity"] for c in by_method[m]]),
                        "accuracy": spread([c["accuracy"] for c in by_method[m]]),
                    }
                    for m in methods
                },
                "minus_art": differences,
            }
        )
    return rows


def seed_of(cell: dict[str, Any]) -> int:
    return int(cell["seed"])


def markdown_table(summary: list[dict[str, Any]], methods: list[str], variants: list[str]) -> str:
    header = ["transfer set", "budget"]
    header += [f"{m} fidelity (accuracy)" for m in methods]
    header += [f"{m} fidelity per seed" for m in methods]
    header += [f"{v} - {ART} (min, max)" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in summary:
        stats = row["methods"]
        cells = [row["transfer"], f"{row['budget']:,}"]
        cells += [
            f"{percent(stats[m]['fidelity'])} ({percent(stats[m]['accuracy'])})" for m in methods
        ]
        cells += [" / ".join(f"{v:.1%}" for v in stats[m]["fidelity"]["per_seed"]) for m in methods]
        cells += [
            f"{points(d['mean'])} ({points(d['min'])}, {points(d['max'])})"
            for d in (row["minus_art"][v] for v in variants)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points(difference: float) -> str:
    return f"{difference * 100:+.1f} pp"


def plot(path: Path, summary: list[dict[str, Any]], methods: list[str]) -> None:
    """Fidelity against budget, one panel per transfer set, error bars over the seeds."""
    transfers = list(dict.fromkeys(row["transfer"] for row in summary))
    figure = Figure(figsize=(5.0 * len(transfers), 3.8), dpi=110)
    axes = figure.subplots(1, len(transfers), squeeze=False).ravel()
    for axis, transfer in zip(axes, transfers, strict=True):
        rows = [row for row in summary if row["transfer"] == transfer]
        budgets = [row["budget"] for row in rows]
        for method, marker in zip(methods, ("o-", "s--", "^-.", "d:"), strict=False):
            fidelity = [row["methods"][method]["fidelity"] for row in rows]
            axis.errorbar(
                budgets, [f["mean"] for f in fidelity], yerr=[f["std"] for f in fidelity],
                fmt=marker, capsize=3, label=method,
            )  # fmt: skip
        if len(budgets) > 1:
            axis.set_xscale("log")
        axis.set_xticks(budgets, [f"{b:,}" for b in budgets])
        axis.minorticks_off()
        axis.set_ylim(0.0, 1.0)
        axis.set_xlabel("queries answered by the victim")
        axis.set_ylabel("fidelity to the victim")
        axis.set_title(f"Knockoff from {transfer}", fontsize="medium")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    figure.suptitle("ours vs ART's KnockoffNets (mean ± std over seeds)", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
