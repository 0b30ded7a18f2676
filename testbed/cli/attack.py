"""The attacker: `mlaas attack knockoff|realistic|copycat|jbda`.

Each command's attack options come from its attack's model in :mod:`attacker.config`:
field ``name_x`` is option ``--name-x``, with the field's description as help and its
default. The run options, which every command shares and which are not part of the attack's
recorded configuration (keys never are), are declared once below.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from attacker.config import CONFIG_CLASSES, BaseAttackConfig, for_attack
from testbed.cli.common import attack_app, err, fail

# ------------------------------------------------------------------------ run options
Url = Annotated[str, typer.Option(envvar="MLAAS_URL", help="The prediction API's base URL")]
Keys = Annotated[
    list[str],
    typer.Option(
        "--key", envvar="MLAAS_KEY", help="API key; repeat to spread queries over several keys"
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Run directory (rerun it to resume)")]
EvalKey = Annotated[
    str | None,
    typer.Option(help="Experimenter key for the victim's test labels (fidelity); not budgeted"),
]
Oracle = Annotated[
    Path | None,
    typer.Option(help="Victim labels from `mlaas victim oracle`, instead of --eval-key"),
]
Throttle = Annotated[float | None, typer.Option(help="At most this many images per second")]
Concurrency = Annotated[int, typer.Option(help="Requests in flight at once")]
QueryBatch = Annotated[int, typer.Option(help="Images per request")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars")]


def _run_options(attack: str) -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The run options before the attack's own, and after them (as in each command's help)."""

    def option(name: str, annotation: object, default: Any = inspect.Parameter.empty):
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
        )

    return (
        [option("url", Url), option("key", Keys), option("out", Out, Path(f"runs/{attack}"))],
        [
            option("eval_key", EvalKey, None),
            option("oracle", Oracle, None),
            option("throttle", Throttle, None),
            option("concurrency", Concurrency, 4),
            option("query_batch", QueryBatch, 64),
            option("quiet", Quiet, False),
        ],
    )


# ------------------------------------------------------------------ attack options
# Left to experiment files and the Python API: the commands never offered them.
_NOT_OFFERED = frozenset(
    {"transfer_size", "train_batch_size", "optimizer", "lr", "augment", "val_fraction",
     "patience", "device", "bandit_lr", "step", "retrain_every"}
)  # fmt: skip
_OFFERED_BY = {"realistic": {"patience"}}  # the realistic attack stops early by design
# Options these attacks take that their commands never offered; they keep their options.
_NOT_OFFERED_BY = {"copycat": {"cover", "cover_rate"}, "jbda": {"pretrained"}}
_FLAGS = {"jbda_lambda": "--lambda", "jbda_tau": "--tau"}


def _offered(attack: str, name: str, field: FieldInfo) -> bool:
    annotation = field.annotation
    if get_origin(annotation) is Literal and len(get_args(annotation)) == 1:
        return False  # fixed for the attack: its name, copycat's label_only
    if name in _NOT_OFFERED_BY.get(attack, ()):
        return False
    return name not in _NOT_OFFERED or name in _OFFERED_BY.get(attack, ())


def _attack_option(name: str, field: FieldInfo) -> inspect.Parameter:
    annotation: Any = field.annotation
    default = field.get_default(call_default_factory=True)
    if name == "checkpoints":  # a comma list on the command line
        annotation, default = str, ",".join(str(c) for c in default)
    flags = [_FLAGS[name]] if name in _FLAGS else []
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(*flags, help=field.description)],
    )


def _register(attack: str, model: type[BaseAttackConfig]) -> None:
    before, after = _run_options(attack)
    own = [
        _attack_option(name, field)
        for name, field in model.model_fields.items()
        if _offered(attack, name, field)
    ]

    def command(**options: Any) -> None:
        _attack(attack, options)

    # typer reads the options from the signature, which inspect.signature takes from
    # __signature__ (an attribute functions do not declare, hence the ignore).
    command.__signature__ = inspect.Signature([*before, *own, *after])  # type: ignore[attr-defined]
    command.__doc__ = model.__doc__
    attack_app.command(attack)(command)


_RUN_OPTIONS = ("url", "key", "out", "eval_key", "oracle", "throttle", "concurrency",
                "query_batch", "quiet")  # fmt: skip


def _attack(attack: str, options: dict[str, Any]) -> None:
    from attacker.client import BudgetExhausted, KeyRefused, RateLimited
    from attacker.runner import ConfigMismatch, run_attack
    from mlaas.datasets import DatasetUnavailable
    from mlaas.models import PretrainedWeightsUnavailable

    run = {k: options.pop(k) for k in _RUN_OPTIONS}
    try:
        if "checkpoints" in options:
            listed = options["checkpoints"].split(",")
            options["checkpoints"] = [int(c) for c in listed if c.strip()]
        config = for_attack(attack, **options)
        metrics = run_attack(
            config,
            url=run["url"],
            keys=run["key"],
            out=run["out"],
            eval_key=run["eval_key"],
            oracle=run["oracle"],
            query_batch=run["query_batch"],
            concurrency=run["concurrency"],
            throttle_qps=run["throttle"],
            progress=not run["quiet"],
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
        + f"; run directory {run['out']}"
    )
    print(json.dumps(final))


for _name, _model in CONFIG_CLASSES.items():
    _register(_name, _model)
