"""The attacker: `mlaas attack knockoff|realistic|copycat|jbda`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from testbed.cli.common import (
    attack_app,
    err,
    fail,
)

# ---------------------------------------------------------------------------- attacks
Url = Annotated[str, typer.Option(envvar="MLAAS_URL", help="The prediction API's base URL")]
Keys = Annotated[
    list[str],
    typer.Option(
        "--key", envvar="MLAAS_KEY", help="API key; repeat to spread queries over several keys"
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Run directory (rerun it to resume)")]
Budget = Annotated[int, typer.Option(help="Hard limit on images the victim answers")]
Transfer = Annotated[
    str | None, typer.Option(help="Transfer set: a registered data set or an ImageFolder path")
]
Arch = Annotated[str, typer.Option(help="Substitute architecture (independent of the victim's)")]
Epochs = Annotated[int | None, typer.Option(help="Substitute training epochs per checkpoint")]
EvalKey = Annotated[
    str | None,
    typer.Option(help="Experimenter key for the victim's test labels (fidelity); not budgeted"),
]
Oracle = Annotated[
    Path | None,
    typer.Option(help="Victim labels from `mlaas victim oracle`, instead of --eval-key"),
]
TestSet = Annotated[str, typer.Option(help="Where accuracy and fidelity are measured")]
EvalSize = Annotated[int | None, typer.Option(help="Seeded subset of the test set")]
Checkpoints = Annotated[
    str, typer.Option(help="Budgets at which the substitute is trained and measured")
]
Seed = Annotated[int, typer.Option(help="Seeds every random choice")]
Throttle = Annotated[float | None, typer.Option(help="At most this many images per second")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight at once")]
QueryBatch = Annotated[int, typer.Option(help="Images per request")]
Cover = Annotated[
    str | None, typer.Option(help="Cover traffic data set, interleaved with the attack's queries")
]
CoverRate = Annotated[float, typer.Option(help="Share of the budget spent on cover traffic")]
Pretrained = Annotated[str | None, typer.Option(help="'imagenet' for a pretrained substitute")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars")]


def _attack(attack: str, options: dict[str, Any]) -> None:
    from attacker.attacks import AttackConfig
    from attacker.client import BudgetExhausted, KeyRefused, RateLimited
    from attacker.runner import ConfigMismatch, run_attack
    from mlaas.datasets import DatasetUnavailable
    from mlaas.models import PretrainedWeightsUnavailable

    run_options = {
        k: options.pop(k)
        for k in ("url", "key", "out", "eval_key", "oracle", "throttle", "concurrency",
                  "query_batch", "quiet")
    }  # fmt: skip
    try:
        checkpoints = [int(c) for c in options.pop("checkpoints").split(",") if c.strip()]
        given = {k: v for k, v in options.items() if v is not None}  # None: not given
        config = AttackConfig.for_attack(attack, checkpoints=checkpoints, **given)
        metrics = run_attack(
            config,
            url=run_options["url"],
            keys=run_options["key"],
            out=run_options["out"],
            eval_key=run_options["eval_key"],
            oracle=run_options["oracle"],
            query_batch=run_options["query_batch"],
            concurrency=run_options["concurrency"],
            throttle_qps=run_options["throttle"],
            progress=not run_options["quiet"],
            console=err,
        )
    except (
        KeyRefused, RateLimited, BudgetExhausted, ConfigMismatch, DatasetUnavailable,
        PretrainedWeightsUnavailable, ValueError,
    ) as exc:  # fmt: skip
        raise fail(str(exc)) from exc
    final = metrics["final"]
    fidelity = final["fidelity"]
    err.print(
        f"[green]done[/]: {final['queries']} queries, substitute accuracy {final['accuracy']:.2%}"
        + (f", fidelity {fidelity:.2%}" if fidelity is not None else "")
        + f"; run directory {run_options['out']}"
    )
    print(json.dumps(final))


_DEFAULT_CHECKPOINTS = "500,1000,2000,5000,10000"


@attack_app.command("knockoff")
def attack_knockoff(
    url: Url,
    key: Keys,
    out: Out = Path("runs/knockoff"),
    budget: Budget = 5000,
    transfer: Transfer = "natural-crops",
    strategy: Annotated[str, typer.Option(help="random or adaptive (gradient bandit)")] = "random",
    reward: Annotated[str, typer.Option(help="adaptive reward: cert, div, loss or all")] = "all",
    clusters: Annotated[int, typer.Option(help="adaptive actions when the set has no labels")] = 20,
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Epochs = None,
    label_only: Annotated[bool, typer.Option(help="Train on top-1 labels only")] = False,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    cover: Cover = None,
    cover_rate: CoverRate = 0.0,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Knockoff nets: natural images from another distribution, labelled by the victim."""
    _attack("knockoff", dict(locals()))


@attack_app.command("realistic")
def attack_realistic(
    url: Url,
    key: Keys,
    out: Out = Path("runs/realistic"),
    budget: Budget = 5000,
    transfer: Transfer = "fashion-mnist:pool",
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Annotated[
        int | None, typer.Option(help="Most epochs; early stopping ends sooner")
    ] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience (epochs)")] = None,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    cover: Cover = None,
    cover_rate: CoverRate = 0.0,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Atli et al.'s realistic adversary: in-domain public data and strong training choices
    (augmentation, LR schedule, early stopping on a split of its own queries)."""
    _attack("realistic", dict(locals()))


@attack_app.command("copycat")
def attack_copycat(
    url: Url,
    key: Keys,
    out: Out = Path("runs/copycat"),
    budget: Budget = 5000,
    transfer: Transfer = "natural-crops",
    arch: Arch = "cnn-small",
    pretrained: Pretrained = None,
    epochs: Epochs = None,
    checkpoints: Checkpoints = _DEFAULT_CHECKPOINTS,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Copycat CNN: non-problem-domain images, trained on the victim's labels only."""
    _attack("copycat", dict(locals()))


@attack_app.command("jbda")
def attack_jbda(
    url: Url,
    key: Keys,
    out: Out = Path("runs/jbda"),
    budget: Budget = 5000,
    transfer: Annotated[str | None, typer.Option(help="Where the seed set comes from")] = (
        "fashion-mnist:pool"
    ),
    seed_size: Annotated[int, typer.Option(help="Initial in-domain images")] = 150,
    jbda_lambda: Annotated[
        float, typer.Option("--lambda", help="Step size, in [0, 1] pixels")
    ] = 0.1,
    jbda_tau: Annotated[int, typer.Option("--tau", help="Rounds between sign flips")] = 3,
    arch: Arch = "cnn-small",
    epochs: Epochs = None,
    eval_key: EvalKey = None,
    oracle: Oracle = None,
    test_set: TestSet = "fashion-mnist:test",
    eval_size: EvalSize = None,
    throttle: Throttle = None,
    concurrency: Concurrency = 4,
    query_batch: QueryBatch = 64,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Papernot et al.'s JBDA: a small seed set, doubled each round along the substitute's
    Jacobian, every round queried through the API."""
    _attack("jbda", {**locals(), "checkpoints": ""})
