"""Running an attack end to end into a run directory.

``RUN/config.json``       the attack's configuration (never the keys)
``RUN/cache.sqlite``      every answer bought, and batches in flight: a rerun resumes from it
``RUN/eval-cache.sqlite`` the victim's labels on the test split (experimenter key, unbilled)
``RUN/metrics.json``      accuracy and fidelity at each checkpoint, rewritten as they come
``RUN/curve.png``         accuracy and fidelity against queries
``RUN/substitute/``       the final substitute: ``model.pt`` and ``card.json``
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from attacker.attacks import Victim, attack_stream, train_substitute
from attacker.client import ExtractionClient
from attacker.config import AttackConfig, KnockoffConfig
from attacker.evaluation import Evaluator, make_evaluator
from mlaas.images import InputShape
from mlaas.modelstore import ModelCard, save_model, write_json_atomic
from mlaas.plots import curve_plot


class ConfigMismatch(ValueError):
    pass


_NOT_COMPARED = frozenset({"url"})


@dataclass
class RunDirectory:
    path: Path

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    config = property(lambda self: self.path / "config.json")
    cache = property(lambda self: self.path / "cache.sqlite")
    eval_cache = property(lambda self: self.path / "eval-cache.sqlite")
    metrics = property(lambda self: self.path / "metrics.json")
    curve = property(lambda self: self.path / "curve.png")
    substitute = property(lambda self: self.path / "substitute")

    def claim(self, config: dict[str, Any]) -> bool:
        """Record ``config``; True when resuming a run with the same configuration.

        A different configuration in a used directory is refused: its cache would mix runs.
        Compared are the settings both records hold, except the server's URL (a victim served
        again on another port still answers the same): runs recorded before an attack had some
        option resume under its value today, and settings only the recorded one holds (runs
        from before each attack had its own options) are ignored.
        """
        if self.config.exists():
            previous = json.loads(self.config.read_text())
            changed = sorted(
                k
                for k in config
                if k in previous and k not in _NOT_COMPARED and previous[k] != config[k]
            )
            if changed:
                raise ConfigMismatch(
                    f"{self.path} holds a run with other settings ({', '.join(changed)}); "
                    "use another --out, or the same options to resume it"
                )
            return True
        write_json_atomic(self.config, config)
        return False


def run_attack(
    config: AttackConfig,
    *,
    url: str,
    keys: list[str],
    out: Path,
    eval_key: str | None = None,
    oracle: Path | None = None,
    query_batch: int = 64,
    concurrency: int = 4,
    throttle_qps: float | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    run = RunDirectory(out)
    resumed = run.claim({**config.to_dict(), "url": url, "keys": len(keys)})
    if resumed:
        console.print(f"[yellow]resuming[/] the run in {out}: answered queries come from its cache")
    started = time.perf_counter()
    with ExtractionClient(
        url,
        keys,
        budget=config.budget,
        cache_path=run.cache,
        batch_size=query_batch,
        concurrency=concurrency,
        throttle_qps=throttle_qps,
        progress=progress,
        console=console,
        seed=config.seed,
    ) as client:
        info = client.model_info()
        victim = Victim(InputShape.parse(info.input_shape), len(info.classes))
        evaluator = _evaluator(config, url, victim, run, eval_key, oracle)
        records: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {
            "attack": config.attack,
            "strategy": config.strategy if isinstance(config, KnockoffConfig) else None,
            "victim": {"name": info.name, "classes": info.classes},
            "victim_test_accuracy": evaluator.victim_accuracy,
            "budget": config.budget,
            "checkpoints": records,
        }
        stream = attack_stream(client, config, victim)
        model = None
        checkpoint = next(stream)
        while True:
            if checkpoint.selection_only:  # chooses the next round's queries; not measured
                console.print(f"choosing the next queries after {checkpoint.queries}")
                checkpoint = stream.send(train_substitute(config, victim, checkpoint))
                continue
            console.print(f"training the substitute on {len(checkpoint.images)} answers")
            model = train_substitute(config, victim, checkpoint)
            scores = evaluator.evaluate(model)
            records.append(
                {
                    "queries": checkpoint.queries,
                    "train_size": len(checkpoint.images),
                    **scores,
                    "elapsed_s": round(time.perf_counter() - started, 1),
                }
            )
            metrics["hard_labels"] = checkpoint.answers.hard or config.trains_on_labels
            metrics["victim"]["granularity"] = ",".join(client.cache.granularities())
            _report(console, records[-1])
            write_json_atomic(run.metrics, metrics)
            try:
                checkpoint = stream.send(model)
            except StopIteration:
                break
        metrics.update(
            {
                "queries_spent": client.spent,
                "queries_sent_this_run": client.sent_images,
                "retries": client.retries,
                "final": records[-1],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    write_json_atomic(run.metrics, metrics)
    final = records[-1]
    save_model(
        run.substitute,
        model,
        ModelCard(
            name=f"substitute-{config.attack}",
            architecture=config.arch,
            dataset=config.transfer,
            num_classes=victim.num_classes,
            classes=info.classes,
            input_shape=str(victim.shape),
            mean=model.mean.flatten().tolist(),
            std=model.std.flatten().tolist(),
            pretrained=config.pretrained,
            test_accuracy=final["accuracy"],
            seed=config.seed,
            epochs=config.epochs,
            num_parameters=sum(p.numel() for p in model.parameters()),
            extra={"fidelity": final["fidelity"], "queries": final["queries"]},
        ),
    )
    label = config.attack + (f" ({config.strategy})" if isinstance(config, KnockoffConfig) else "")
    curve_plot(
        run.curve,
        [r["queries"] for r in records],
        {
            "substitute accuracy": [r["accuracy"] for r in records],
            "fidelity to the victim": [r["fidelity"] for r in records],
        },
        title=f"{label} against {info.name}",
        xlabel="queries answered by the victim",
        ylabel="on the victim's test split",
        reference=("victim accuracy", evaluator.victim_accuracy)
        if evaluator.victim_accuracy is not None
        else None,
    )
    return metrics


def _evaluator(
    config: AttackConfig,
    url: str,
    victim: Victim,
    run: RunDirectory,
    eval_key: str | None,
    oracle: Path | None,
) -> Evaluator:
    if eval_key is None:
        return make_evaluator(config.test_set, victim.shape, size=config.eval_size, oracle=oracle)
    with ExtractionClient(url, eval_key, cache_path=run.eval_cache, progress=False) as client:
        return make_evaluator(
            config.test_set, victim.shape, size=config.eval_size, eval_client=client, oracle=oracle
        )


def _report(console: Console, record: dict[str, Any]) -> None:
    fidelity = record["fidelity"]
    console.print(
        f"{record['queries']:>6} queries: substitute accuracy {record['accuracy']:.2%}"
        + (f", fidelity {fidelity:.2%}" if fidelity is not None else "")
    )
