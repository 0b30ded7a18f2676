"""Each attack's own configuration: its options and defaults, what it refuses, the
`mlaas attack` command built from it, and experiment attackers checked against it."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import typer.main
from pydantic import ValidationError
from typer.testing import CliRunner

from attacker.config import (
    AttackConfigError,
    CopycatConfig,
    JbdaConfig,
    KnockoffConfig,
    RealisticConfig,
    for_attack,
    parse_attack_config,
)
from testbed.cli import app
from testbed.experiments.config import ExperimentConfig
from testbed.experiments.runner import attack_config

# The one configuration every attack had before each had its own, and each attack's defaults.
FORMER_DEFAULTS: dict[str, Any] = {
    "budget": 5000, "transfer": "natural-crops", "transfer_size": None, "strategy": "random",
    "reward": "all", "arch": "cnn-small", "pretrained": None, "epochs": 30,
    "train_batch_size": 128, "optimizer": "adam", "lr": None, "augment": False,
    "val_fraction": 0.0, "patience": None, "label_only": False,
    "checkpoints": [500, 1000, 2000, 5000, 10000], "test_set": "fashion-mnist:test",
    "eval_size": None, "seed": 0, "device": "auto", "clusters": 20, "bandit_lr": 0.1,
    "step": 32, "retrain_every": 1000, "cover": None, "cover_rate": 0.0, "seed_size": 150,
    "jbda_lambda": 0.1, "jbda_tau": 3,
}  # fmt: skip
FORMER_ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "knockoff": {"transfer": "natural-crops"},
    "realistic": {
        "transfer": "fashion-mnist:pool", "augment": True, "val_fraction": 0.1, "patience": 8,
        "epochs": 60,
    },
    "copycat": {"transfer": "natural-crops", "label_only": True},
    "jbda": {"transfer": "fashion-mnist:pool"},
}  # fmt: skip

COMMON = {
    "budget", "transfer", "transfer_size", "arch", "pretrained", "epochs", "train_batch_size",
    "optimizer", "lr", "augment", "val_fraction", "patience", "test_set", "eval_size", "seed",
    "device",
}  # fmt: skip
SAMPLED = COMMON | {"checkpoints", "cover", "cover_rate"}
OPTIONS = {
    "knockoff": SAMPLED
    | {"strategy", "reward", "clusters", "bandit_lr", "step", "retrain_every", "label_only"},
    "realistic": SAMPLED,
    "copycat": SAMPLED | {"label_only"},
    "jbda": COMMON | {"seed_size", "jbda_lambda", "jbda_tau"},
}


@pytest.mark.parametrize("attack", OPTIONS)
def test_each_attack_takes_its_options_with_the_defaults_it_always_had(attack: str) -> None:
    former = {**FORMER_DEFAULTS, **FORMER_ATTACK_DEFAULTS[attack]}
    expected = {name: former[name] for name in OPTIONS[attack]}
    assert for_attack(attack).to_dict() == {**expected, "attack": attack}


@pytest.mark.parametrize(
    ("attack", "option", "value"),
    [
        ("jbda", "cover", "natural-crops"),
        ("jbda", "checkpoints", [100]),  # JBDA measures after each round
        ("realistic", "strategy", "adaptive"),
        ("copycat", "reward", "cert"),
        ("realistic", "label_only", True),
        ("knockoff", "seed_size", 10),
        ("knockoff", "epoch", 3),  # a typo is refused too, not ignored
    ],
)
def test_an_option_the_attack_does_not_take_is_refused(attack: str, option: str, value) -> None:
    with pytest.raises(AttackConfigError, match=f"the {attack} attack takes no option '{option}'"):
        for_attack(attack, **{option: value})


@pytest.mark.parametrize(
    ("attack", "options", "message"),
    [
        ("knockoff", {"budget": 0}, "at least one query"),
        ("knockoff", {"strategy": "smart"}, "random or adaptive, not 'smart'"),
        ("realistic", {"cover": "mnist", "cover_rate": 1.0}, r"in \[0, 1\)"),
        ("copycat", {"cover_rate": 0.2}, "needs a cover data set"),
        ("knockoff", {"strategy": "adaptive", "cover": "mnist"}, "sends no cover traffic"),
        ("jbda", {"budget": 100, "seed_size": 150}, r"seed set \(150\) exceeds the budget"),
        ("copycat", {"label_only": False}, "label_only: Input should be True"),
        ("steal", {}, "unknown attack 'steal'"),
    ],
)
def test_bad_values_are_refused_clearly(attack: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        for_attack(attack, **options)


@pytest.mark.parametrize(
    ("attack", "options", "model"),
    [
        ("knockoff", {"strategy": "adaptive", "label_only": True, "clusters": 5}, KnockoffConfig),
        ("realistic", {"cover": "mnist", "cover_rate": 0.25, "patience": None}, RealisticConfig),
        ("copycat", {"checkpoints": [10, 20], "budget": 20}, CopycatConfig),
        ("jbda", {"seed_size": 25, "jbda_tau": 2, "pretrained": "imagenet"}, JbdaConfig),
    ],
)
def test_a_configuration_round_trips_through_its_record(
    attack: str, options: dict, model: type
) -> None:
    config = for_attack(attack, **options)
    record = json.loads(json.dumps(config.to_dict()))  # as a run directory stores it
    again = parse_attack_config(record)
    assert isinstance(again, model) and again == config
    assert all(getattr(again, name) == value for name, value in options.items())


def test_copycat_and_label_only_knockoff_train_on_labels() -> None:
    assert for_attack("copycat").trains_on_labels
    assert for_attack("knockoff", label_only=True).trains_on_labels
    assert not for_attack("knockoff").trains_on_labels
    assert not for_attack("realistic").trains_on_labels
    realistic = for_attack("realistic", epochs=4).train_config()
    assert (realistic.epochs, realistic.augment, realistic.val_fraction, realistic.patience) == (
        4, True, 0.1, 8,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- CLI
RUN = {"--url", "--key", "--out", "--eval-key", "--oracle", "--throttle", "--concurrency",
       "--query-batch", "--quiet"}  # fmt: skip
TRAINING = {"--budget", "--transfer", "--arch", "--epochs", "--test-set", "--eval-size", "--seed"}
CLI_OPTIONS = {  # what each command offered before its options were generated
    "knockoff": RUN | TRAINING | {"--pretrained", "--checkpoints", "--cover", "--cover-rate",
                                  "--strategy", "--reward", "--clusters", "--label-only",
                                  "--no-label-only"},
    "realistic": RUN | TRAINING | {"--pretrained", "--checkpoints", "--cover", "--cover-rate",
                                   "--patience"},
    "copycat": RUN | TRAINING | {"--pretrained", "--checkpoints"},
    "jbda": RUN | TRAINING | {"--seed-size", "--lambda", "--tau"},
}  # fmt: skip


def _command(attack: str):
    return typer.main.get_command(app).commands["attack"].commands[attack]


@pytest.mark.parametrize("attack", CLI_OPTIONS)
def test_each_command_offers_exactly_its_options(attack: str) -> None:
    command = _command(attack)
    offered = {flag for p in command.params for flag in [*p.opts, *p.secondary_opts]}
    assert offered == CLI_OPTIONS[attack]
    description = inspect.getdoc(type(for_attack(attack)))  # the attack's own, as help
    assert command.help is not None and inspect.cleandoc(command.help) == description
    help_text = CliRunner().invoke(app, ["attack", attack, "--help"], terminal_width=200).output
    assert all(flag in help_text for flag in CLI_OPTIONS[attack])


@pytest.mark.parametrize(
    ("attack", "option", "default"),
    [
        ("knockoff", "checkpoints", "500,1000,2000,5000,10000"),
        ("knockoff", "out", "runs/knockoff"),
        ("knockoff", "transfer", "natural-crops"),
        ("realistic", "transfer", "fashion-mnist:pool"),
        ("realistic", "epochs", 60),
        ("realistic", "patience", 8),
        ("copycat", "epochs", 30),
        ("jbda", "jbda_lambda", 0.1),
        ("jbda", "jbda_tau", 3),
    ],
)
def test_command_defaults_are_the_attacks_defaults(attack: str, option: str, default) -> None:
    (param,) = [p for p in _command(attack).params if p.name == option]
    assert str(param.default) == str(default)


def test_the_shared_run_options_keep_their_environment_variables() -> None:
    params = {p.name: p for p in _command("copycat").params}
    assert params["url"].envvar == "MLAAS_URL" and params["url"].required
    assert params["key"].envvar == "MLAAS_KEY" and params["key"].multiple


def _attack_cli(*args: str):
    url = ["--url", "http://127.0.0.1:9", "--key", "mlk_x"]  # never reached: refused before
    return CliRunner().invoke(app, ["attack", *args[:1], *url, *args[1:]], terminal_width=200)


def test_a_command_refuses_an_option_its_attack_does_not_take() -> None:
    result = _attack_cli("jbda", "--cover", "natural-crops")
    assert result.exit_code != 0 and "No such option: --cover" in result.output
    result = _attack_cli("realistic", "--strategy", "adaptive")
    assert result.exit_code != 0 and "No such option: --strategy" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knockoff", "--cover-rate", "0.5"], "cover_rate needs a cover data set"),
        (["knockoff", "--strategy", "smart"], "random or adaptive"),
        (["jbda", "--budget", "100"], "seed set (150) exceeds the budget"),
        (["copycat", "--checkpoints", "100,many"], "many"),
    ],
)
def test_a_command_reports_bad_options_before_any_query(
    args: list[str], message: str, tmp_path
) -> None:
    result = _attack_cli(*args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "run").exists()  # refused before a run directory was made


# ------------------------------------------------------------------ experiment attackers
def _experiment(*attackers: dict) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"name": "t", "victims": [{"name": "v", "dataset": "mnist"}], "attackers": attackers}
    )


def test_an_attacker_carries_its_attacks_options_into_each_cell() -> None:
    config = _experiment(
        {"name": "r", "attack": "realistic", "budgets": [200, 100], "patience": 5,
         "transfer": "{dataset}:pool"},
        {"name": "j", "attack": "jbda", "budgets": [300], "seed_size": 75, "epochs": 2},
    )  # fmt: skip
    realistic, jbda = (attack_config(cell, config) for cell in config.cells())
    assert isinstance(realistic, RealisticConfig) and isinstance(jbda, JbdaConfig)
    assert (realistic.patience, realistic.epochs, realistic.transfer) == (5, 60, "mnist:pool")
    assert (realistic.budget, realistic.checkpoints, realistic.test_set) == (
        200, [100, 200], "mnist:test",
    )  # fmt: skip
    assert (jbda.budget, jbda.seed_size, jbda.epochs) == (300, 75, 2)
    record = config.cells()[0].model_dump()["attacker"]
    assert record["arch"] == "cnn-small" and record["augment"] is True  # defaults recorded


@pytest.mark.parametrize(
    ("attacker", "message"),
    [
        ({"attack": "jbda", "cover": "mnist"}, "attacker 'a': the jbda attack takes no option"),
        ({"attack": "copycat", "strategy": "adaptive"}, "attacker 'a': the copycat attack"),
        ({"attack": "knockoff", "seed": 3}, "attacker 'a': the experiment sets seed"),
        ({"attack": "knockoff", "epochs": "many"}, "attacker 'a': knockoff epochs"),
    ],
)
def test_an_attacker_with_options_its_attack_does_not_take_is_refused_on_load(
    attacker: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _experiment({"name": "a", "budgets": [100], **attacker})
