"""An experiment's report: Markdown tables and PNG plots of what the paper measures.

Sections: each server group whose clients ran side by side; every cell; accuracy and fidelity
against queries; probabilities vs top-k vs label;
victim/substitute architecture mismatch; pretrained vs from scratch; detection (attack x
detector, queries to detection, benign false alarms); perturbation defenses (what they cost
the attacker and benign users); and the paper's four claims, each with what this run measured
and whether it supports it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DETECTOR_ORDER = ("ood-binary", "msp", "mahalanobis", "prada")


def load_records(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """The records of the configuration last run in ``out`` (records left by an edited
    configuration have other cell ids and are left out)."""
    from testbed.experiments.config import ExperimentConfig

    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    if (out / "config.yaml").exists():
        order = {c.id: i for i, c in enumerate(ExperimentConfig.load(out / "config.yaml").cells())}
        records = sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])
    groups = {
        json.loads(p.read_text())["group"]: json.loads(p.read_text())
        for p in sorted((out / "groups").glob("*.json"))
    }
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    return ok, failed, groups


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _final(record: dict[str, Any]) -> dict[str, Any]:
    return record["metrics"]["final"]


def _label(record: dict[str, Any]) -> str:
    cell = record["cell"]
    return f"{cell['attacker']['name']} ({cell['granularity']})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _no_defense(record: dict[str, Any]) -> bool:
    """The attacker got the victim's own answers: no perturbation, and no detector or one
    that only watches (policy monitor), since watching changes no answer."""
    defense = record["cell"]["defense"]
    watching = not defense["detectors"] or defense.get("policy", "monitor") == "monitor"
    return watching and defense["perturbation"] == "none"


def _first_seed_undefended(ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (victim, attacker, granularity) with undefended answers: of the lowest
    seed, a cell without detectors where there is one (the claims give the spread)."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for r in sorted(ok, key=lambda r: (r["cell"]["seed"], bool(r["cell"]["defense"]["detectors"]))):
        if not _no_defense(r):
            continue
        key = (r["cell"]["victim"]["name"], r["cell"]["attacker"]["name"], r["cell"]["granularity"])
        chosen.setdefault(key, r)
    return list(chosen.values())


def write_report(out: Path) -> Path:
    ok, failed, groups = load_records(out)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# Experiment report: {out.name}", ""]
    lines += [f"{len(ok)} cells measured, {len(failed)} failed.", ""]
    lines += _claims(ok, groups)
    lines += _side_by_side(ok + failed, groups)
    lines += ["## Every cell", ""]
    lines += _table(
        ["victim", "defense", "granularity", "attacker", "seed", "queries", "accuracy",
         "of victim", "fidelity", "first alert"],
        [
            [r["cell"]["victim"]["name"], r["cell"]["defense"]["name"], r["cell"]["granularity"],
             r["cell"]["attacker"]["name"], str(r["cell"]["seed"]), f"{_final(r)['queries']:,}",
             _pct(_final(r)["accuracy"]), f"{_final(r)['accuracy'] / r['victim_accuracy']:.2f}",
             _pct(_final(r)["fidelity"]), _first_alert(r)]
            for r in ok
        ],
    )  # fmt: skip
    if failed:
        lines += ["", "Failed cells:", ""]
        lines += [f"- `{r['id']}`: {r['error']}" for r in failed]
    undefended = _first_seed_undefended(ok)
    seeds = sorted({r["cell"]["seed"] for r in ok})
    if len(seeds) > 1:
        lines += ["", f"The sections below show seed {seeds[0]}; the claims above give the "
                  f"spread over seeds {', '.join(map(str, seeds))}."]  # fmt: skip
    lines += ["", "## Accuracy and fidelity against queries", ""]
    lines += _curves(undefended, figures)
    lines += ["", "## Probabilities vs top-k vs label", ""]
    lines += _granularity(undefended, figures)
    lines += ["", "## Victim and substitute architectures", ""]
    lines += _architectures(undefended)
    lines += ["", "## Pretrained vs from scratch", ""]
    lines += _pretrained(ok)
    lines += ["", "## Detection", ""]
    lines += _detection(ok, groups)
    lines += ["", "## Perturbation defenses", ""]
    lines += _perturbations(ok, groups)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _side_by_side(records: list[dict[str, Any]], groups: dict) -> list[str]:
    """Per group whose clients queried one server at once: every client as the provider saw
    it, and each attack's own curve."""
    lines = []
    for group_id, group in groups.items():
        if not group.get("side_by_side"):
            continue
        attackers = [r for r in records if r.get("group") == group_id]
        defense, benign = group["defense"], group["benign"]["clients"]
        clients = sum(c["queries_logged"] for c in benign)
        clients += sum(r.get("queries_logged", 0) for r in attackers)
        lines += [
            f"## Side by side: {group_id}",
            "",
            f"{group['victim']['name']} (test accuracy {_pct(group['victim']['test_accuracy'])}) "
            f"with detectors {', '.join(defense['detectors']) or 'none'} (policy "
            f"{defense['policy']}); {clients:,} client queries and "
            f"{group['experimenter_queries']:,} experimenter queries answered, "
            f"{group['log_rows']:,} log rows; {group['seconds']:.0f} s.",
            "",
        ]
        rows = [
            [c["client"], f"{c['queries_logged']:,}", "-", "-", _pct(c["accuracy"]),
             alerts_text(c["alerts"])]
            for c in benign
        ]  # fmt: skip
        for r in attackers:
            final = _final(r) if r["status"] == "ok" else {"accuracy": None, "fidelity": None}
            name = r["cell"]["attacker"]["name"] + ("" if r["status"] == "ok" else " (failed)")
            queries = f"{r.get('queries_logged', 0):,}"
            scores = [_pct(final["accuracy"]), _pct(final["fidelity"]), "-"]
            rows.append([name, queries, *scores, alerts_text(r.get("alerts") or {})])
        header = ["client", "queries", "substitute accuracy", "fidelity"]
        header += ["accuracy through the API", "alerts (detector @ query)"]
        lines += _table(header, rows)
        alarmed = sum(1 for c in benign if c["alerts"])
        lines += ["", f"Benign false alarms: {alarmed} of {len(benign)} clients.", ""]
        lines += [
            f"![{r['cell']['attacker']['name']}]({r['run_dir']}/curve.png)"
            for r in attackers
            if r["status"] == "ok"
        ]
        lines.append("")
    return lines


def alerts_text(alerts: dict[str, int]) -> str:
    """``detector @ query count``, earliest first."""
    return ", ".join(f"{d} @ {q}" for d, q in sorted(alerts.items(), key=lambda a: a[1])) or "-"


def _first_alert(record: dict[str, Any]) -> str:
    alerts = record.get("alerts") or {}
    if not alerts:
        return "-"
    detector, count = min(alerts.items(), key=lambda a: a[1])
    return f"{detector} @ {count}"


def _curves(ok: list[dict[str, Any]], figures: Path) -> list[str]:
    lines = []
    by_victim = defaultdict(list)
    for r in ok:
        if _no_defense(r):
            by_victim[r["cell"]["victim"]["name"]].append(r)
    for victim, records in by_victim.items():
        figure = Figure(figsize=(7.5, 4.5), dpi=120)
        axis = figure.subplots()
        for r in records:
            points = r["metrics"]["checkpoints"]
            queries = [p["queries"] for p in points]
            axis.plot(queries, [p["accuracy"] for p in points], "o-", label=f"{_label(r)} acc.")
            if points[0]["fidelity"] is not None:
                axis.plot(
                    queries, [p["fidelity"] for p in points], ":", color=axis.lines[-1].get_color()
                )
        axis.axhline(records[0]["victim_accuracy"], color="grey", linestyle="--", label="victim")
        axis.set_xscale("log")
        axis.set_xlabel("queries answered by the victim")
        axis.set_ylabel("accuracy (solid), fidelity (dotted)")
        axis.set_ylim(0, 1)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
        axis.set_title(f"attacks on {victim}, no defense")
        figure.tight_layout()
        path = figures / f"curves-{victim}.png"
        figure.savefig(path)
        lines.append(f"![curves {victim}](figures/{path.name})")
    return lines or ["No undefended cells."]


def _granularity(ok: list[dict[str, Any]], figures: Path) -> list[str]:
    table: dict[str, dict[str, float]] = defaultdict(dict)
    granularities: list[str] = []
    for r in ok:
        if not _no_defense(r):
            continue
        g = r["cell"]["granularity"]
        if g not in granularities:
            granularities.append(g)
        table[f"{r['cell']['victim']['name']} / {r['cell']['attacker']['name']}"][g] = _final(r)[
            "accuracy"
        ]
    if len(granularities) < 2:
        return ["This run served one granularity only."]
    # Coarsening order: the full vector first, the label alone last.
    granularities.sort(key=lambda g: (g != "probs", g == "label", g))
    rows = [[name] + [_pct(v.get(g)) for g in granularities] for name, v in table.items()]
    figure = Figure(figsize=(7.5, 4.0), dpi=120)
    axis = figure.subplots()
    width = 0.8 / len(granularities)
    names = list(table)
    for i, g in enumerate(granularities):
        axis.bar(np.arange(len(names)) + i * width,
                 [table[n].get(g, np.nan) for n in names], width, label=g)  # fmt: skip
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, fontsize=7)
    axis.set_ylabel("substitute accuracy")
    axis.set_ylim(0, 1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(figures / "granularity.png")
    return [*_table(["victim / attacker", *granularities], rows), "",
            "![granularity](figures/granularity.png)"]  # fmt: skip


def _architectures(ok: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in ok:
        if _no_defense(r):
            cell = r["cell"]
            rows.append([cell["victim"]["arch"], cell["attacker"]["arch"], cell["attacker"]["name"],
                         cell["granularity"], _pct(_final(r)["accuracy"]),
                         _pct(_final(r)["fidelity"])])  # fmt: skip
    if len({(row[0], row[1]) for row in rows}) < 2:
        return ["Every cell used one victim/substitute architecture pair."]
    return _table(["victim arch", "substitute arch", "attacker", "granularity", "accuracy",
                   "fidelity"], rows)  # fmt: skip


def _pretrained(ok: list[dict[str, Any]]) -> list[str]:
    kinds = {(r["cell"]["victim"]["pretrained"] or "scratch") for r in ok}
    kinds |= {(r["cell"]["attacker"]["pretrained"] or "scratch") for r in ok}
    if kinds == {"scratch"}:
        return ["No cell used pretrained weights (they need a download; see paper-gpu.yaml)."]
    return _table(
        ["victim", "victim weights", "substitute weights", "attacker", "accuracy"],
        [[r["cell"]["victim"]["name"], r["cell"]["victim"]["pretrained"] or "scratch",
          r["cell"]["attacker"]["pretrained"] or "scratch", r["cell"]["attacker"]["name"],
          _pct(_final(r)["accuracy"])] for r in ok],
    )  # fmt: skip


def _detection(ok: list[dict[str, Any]], groups: dict) -> list[str]:
    guarded = [r for r in ok if r["cell"]["defense"]["detectors"]]
    if not guarded:
        return ["No cell ran with detectors."]
    detectors = [
        d for d in DETECTOR_ORDER if any(d in r["cell"]["defense"]["detectors"] for r in guarded)
    ]
    rows = [
        [
            r["cell"]["defense"]["name"],
            _label(r),
            str(r["cell"]["seed"]),
            f"{_final(r)['queries']:,}",
        ]
        + [str(r["alerts"][d]) if d in r["alerts"] else "not detected" for d in detectors]
        for r in guarded
    ]
    lines = _table(["defense", "attacker", "seed", "queries", *detectors], rows)
    lines += ["", "Benign clients (public in-domain pool, the configuration's benign shifts):", ""]
    lines += _table(
        ["server group", "clients", "queries each", "false-alarm rate", "accuracy via the API"],
        [[g, str(len(v["benign"]["clients"])),
          str(v["benign"]["clients"][0]["queries"]) if v["benign"]["clients"] else "-",
          _pct(v["benign"]["false_alarm_rate"]), _pct(v["benign"]["accuracy"])]
         for g, v in groups.items()],
    )  # fmt: skip
    return lines


def _perturbations(ok: list[dict[str, Any]], groups: dict) -> list[str]:
    perturbed = [r for r in ok if r["cell"]["defense"]["perturbation"] != "none"]
    if not perturbed:
        return ["No cell ran with a perturbation."]

    def key(r: dict[str, Any]) -> tuple:
        cell = r["cell"]
        return (cell["victim"]["name"], cell["attacker"]["name"], cell["granularity"], cell["seed"])

    baseline = {key(r): _final(r)["accuracy"] for r in ok if _no_defense(r)}
    rows = []
    for r in perturbed:
        benign = groups.get(r["group"], {}).get("benign", {})
        rows.append([r["cell"]["defense"]["name"], r["cell"]["defense"]["perturbation"], _label(r),
                     str(r["cell"]["seed"]), _pct(baseline.get(key(r))),
                     _pct(_final(r)["accuracy"]), _pct(benign.get("accuracy"))])  # fmt: skip
    return _table(["defense", "perturbation", "attacker", "seed", "attacker acc. undefended",
                   "attacker acc. perturbed", "benign accuracy via the API"], rows)  # fmt: skip


def _spread(values: list[float], fmt=_pct) -> str:
    """``mean (min-max over N seeds)``, or the one value."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} (sd {fmt(float(np.std(values)))}, {fmt(min(values))}-{fmt(max(values))} over {len(values)} seeds)"  # noqa: E501


def _verdict(supported: list[bool]) -> str:
    """A claim holds when every seed supports it; one that flips between seeds is no result."""
    if all(supported):
        return "yes" if len(supported) == 1 else f"yes, in {len(supported)}/{len(supported)} seeds"
    if not any(supported):
        return "no"
    return f"mixed: {sum(supported)}/{len(supported)} seeds"


def _claims(ok: list[dict[str, Any]], groups: dict) -> list[str]:
    """The paper's four claims, each measured per seed and reported as mean and spread."""
    seeds = sorted({r["cell"]["seed"] for r in ok})
    rows = []
    per_seed = [
        _claims_of_seed([r for r in ok if r["cell"]["seed"] == s], groups, s) for s in seeds
    ]
    for claim in ("1", "2", "3", "4"):
        measured = [m[claim] for m in per_seed if claim in m]
        if not measured:
            continue
        title, _, _ = measured[0]
        evidence = "; ".join(
            f"{name} {_spread([m[1][name] for m in measured if name in m[1]], fmt)}"
            for name, fmt in measured[0][1]["_format"].items()
        )
        notes = sorted({note for m in measured for note in m[1].get("_notes", [])})
        if notes:
            evidence += "; " + "; ".join(notes)
        rows.append([title, evidence, _verdict([m[2] for m in measured])])
    if not rows:
        return []
    return ["## The paper's claims", "", *_table(["claim", "measured", "supported"], rows), ""]


def _count(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:,.0f}"


def _claims_of_seed(ok: list[dict[str, Any]], groups: dict, seed: int) -> dict[str, tuple]:
    """Per claim: (title, {measure: value, "_format": {measure: formatter}}, supported)."""

    def pick(attack: str, granularity: str = "probs", defended: bool = False):
        return [
            r for r in ok
            if r["cell"]["attacker"]["attack"] == attack and r["cell"]["granularity"] == granularity
            and (bool(r["cell"]["defense"]["detectors"]) if defended else _no_defense(r))
        ]  # fmt: skip

    claims: dict[str, tuple] = {}
    knockoff = pick("knockoff")
    if knockoff:
        best = max(knockoff, key=lambda r: _final(r)["accuracy"])
        accuracy, classes = _final(best)["accuracy"], len(best["metrics"]["victim"]["classes"])
        claims["1"] = ("1. Knockoff nets works",
                       {"best Knockoff (probs) accuracy": accuracy,
                        "fidelity": _final(best)["fidelity"],
                        "_format": {"best Knockoff (probs) accuracy": _pct, "fidelity": _pct},
                        "_notes": [f"chance {1 / classes:.0%}"]},
                       accuracy > 3 / classes)  # fmt: skip
    label_runs = {r["cell"]["attacker"]["name"]: r for r in pick("knockoff", "label")}
    pairs = [(r, label_runs[r["cell"]["attacker"]["name"]]) for r in knockoff
             if r["cell"]["attacker"]["name"] in label_runs]  # fmt: skip
    if pairs:
        gaps = [_final(p)["accuracy"] - _final(q)["accuracy"] for p, q in pairs]
        claims["2"] = ("2. Limited by granularity (and architecture)",
                       {"smallest probabilities-vs-label gap": min(gaps),
                        "_format": {"smallest probabilities-vs-label gap": _pct},
                        "_notes": ["Knockoff accuracy with probability vectors minus with "
                                   "labels only"]},
                       min(gaps) > 0.02)  # fmt: skip
    defended = pick("knockoff", defended=True)
    if defended:
        caught = [r for r in defended if r["alerts"]]
        alarms = [
            g["benign"]["false_alarm_rate"]
            for g in groups.values()
            if g["defense"]["detectors"] and g["benign"]["false_alarm_rate"] is not None
            and g.get("seed", seed) == seed
        ]  # fmt: skip
        first = min((min(r["alerts"].values()) for r in caught), default=float("inf"))
        claims["3"] = ("3. A detector of OOD queries catches Knockoff",
                       {"Knockoff cells flagged": len(caught) / len(defended),
                        "first alert at query": float(first),
                        "benign false-alarm rate": max(alarms) if alarms else 0.0,
                        "_format": {"Knockoff cells flagged": _pct,
                                    "first alert at query": _count,
                                    "benign false-alarm rate": _pct}},
                       len(caught) == len(defended) and not any(alarms))  # fmt: skip
    realistic = pick("realistic")
    realistic_defended = pick("realistic", defended=True)
    if realistic:
        best = max(realistic, key=lambda r: _final(r)["accuracy"])
        ratio = _final(best)["accuracy"] / best["victim_accuracy"]
        flagged_by = sorted({d for r in realistic_defended for d in r["alerts"]})
        notes = []
        if realistic_defended:
            notes.append("flagged by " + ", ".join(flagged_by) if flagged_by else "no alert")
        claims["4"] = ("4. A realistic adversary steals and evades",
                       {"accuracy as a share of the victim's": ratio,
                        "_format": {"accuracy as a share of the victim's": lambda v: f"{v:.2f}"},
                        "_notes": notes},
                       ratio >= 0.9 and not flagged_by)  # fmt: skip
    return claims
