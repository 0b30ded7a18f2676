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
    KNOCKOFF_STRATEGIES,
    AttackConfigError,
    CopycatConfig,
    JbdaConfig,
    KnockoffConfig,
    RealisticConfig,
    for_attack,
    parse_attack_config,
)
from mlaas.training import TrainConfig
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
# Issue 14 (the stronger attacker) changed knockoff's strategy default, and left the one
# training option it added with a strategy-dependent value, distill, to the strategy (None:
# train_config resolves it); every other default was kept. The options it added take these.
ISSUE_14_KNOCKOFF: dict[str, Any] = {"strategy": "kcenter", "distill": None}
ADDED_DEFAULTS: dict[str, Any] = {
    "distill": "probs", "unlabeled_weight": 0.0, "rounds": 5, "initial": 0.2,
    "candidates": 8000, "round_epochs": 15, "public": "fashion-mnist:pool", "keep": 0.25,
}  # fmt: skip

COMMON = {
    "budget", "transfer", "transfer_size", "arch", "pretrained", "epochs", "train_batch_size",
    "optimizer", "lr", "augment", "distill", "val_fraction", "patience", "test_set",
    "eval_size", "seed", "device",
}  # fmt: skip
# JBDA makes its own images: it has no unqueried transfer images to pseudo-label.
SAMPLED = COMMON | {"checkpoints", "cover", "cover_rate", "unlabeled_weight"}
OPTIONS = {
    "knockoff": SAMPLED
    | {"strategy", "reward", "clusters", "bandit_lr", "step", "retrain_every", "label_only"}
    | {"rounds", "initial", "candidates", "round_epochs", "public", "keep"},
    "realistic": SAMPLED,
    "copycat": SAMPLED | {"label_only"},
    "jbda": COMMON | {"seed_size", "jbda_lambda", "jbda_tau"},
}


@pytest.mark.parametrize("attack", OPTIONS)
def test_each_attack_takes_its_options_with_the_defaults_it_always_had(attack: str) -> None:
    former = {**FORMER_DEFAULTS, **ADDED_DEFAULTS, **FORMER_ATTACK_DEFAULTS[attack]}
    if attack == "knockoff":
        former.update(ISSUE_14_KNOCKOFF)
    expected = {name: former[name] for name in OPTIONS[attack]}
    assert for_attack(attack).to_dict() == {**expected, "attack": attack}


@pytest.mark.parametrize(
    ("attack", "option", "value"),
    [
        ("jbda", "cover", "natural-crops"),
        ("jbda", "unlabeled_weight", 0.5),  # no unqueried transfer images to pseudo-label
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
        (
            "knockoff",
            {"strategy": "smart"},
            "one of random, adaptive, kcenter, entropy, entropy-kcenter, stealth, not 'smart'",
        ),
        ("realistic", {"cover": "mnist", "cover_rate": 1.0}, r"in \[0, 1\)"),
        ("copycat", {"cover_rate": 0.2}, "needs a cover data set"),
        ("knockoff", {"strategy": "adaptive", "cover": "mnist"}, "the adaptive strategy sends no"),
        ("knockoff", {"strategy": "entropy", "cover": "mnist"}, "the entropy strategy sends no"),
        ("knockoff", {"cover": "mnist", "cover_rate": 0.1}, "the kcenter strategy sends no cover"),
        ("knockoff", {"strategy": "entropy-kcenter", "cover": "mnist"}, "the entropy-kcenter"),
        (
            "knockoff",
            {"strategy": "stealth", "cover": "mnist", "cover_rate": 0.1},
            "the stealth strategy sends no cover traffic",
        ),
        ("knockoff", {"rounds": 0}, "knockoff: rounds must be at least 1"),
        ("knockoff", {"initial": 0.0}, r"initial is a share of the budget, in \(0, 1\)"),
        ("knockoff", {"initial": 1.0}, r"initial is a share of the budget, in \(0, 1\)"),
        ("knockoff", {"candidates": 0}, "candidates must be at least 1"),
        ("knockoff", {"round_epochs": 0}, "round_epochs must be at least 1"),
        ("knockoff", {"keep": 0.0}, r"keep is a share of the transfer set, in \(0, 1\]"),
        ("knockoff", {"keep": 1.5}, r"keep is a share of the transfer set, in \(0, 1\]"),
        ("knockoff", {"distill": "soft"}, "knockoff distill"),
        ("realistic", {"distill": "soft"}, "realistic distill"),
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
        ("knockoff", {}, KnockoffConfig),  # the strategy's training options stay unresolved
        ("knockoff", {"strategy": "stealth", "keep": 0.5, "public": "mnist:pool"}, KnockoffConfig),
        (
            "knockoff",
            dict(rounds=3, initial=0.25, candidates=200, round_epochs=4, distill="logits"),
            KnockoffConfig,
        ),
        ("knockoff", {"strategy": "random", "cover": "mnist", "cover_rate": 0.1}, KnockoffConfig),
        ("realistic", {"distill": "logits", "unlabeled_weight": 0.5}, RealisticConfig),
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


def test_knockoff_options_at_their_bounds_are_taken() -> None:
    config = for_attack("knockoff", rounds=1, initial=0.01, candidates=1, round_epochs=1, keep=1.0)
    assert (config.rounds, config.initial, config.candidates) == (1, 0.01, 1)
    assert (config.round_epochs, config.keep) == (1, 1.0)


# The paper's Knockoff nets: soft labels, no augmentation, every answer trained on, all epochs.
PAPER = {"distill": "probs", "augment": False, "val_fraction": 0.0, "patience": None,
         "unlabeled_weight": 0.0}  # fmt: skip
# The other strategies: the same, but matching the answers' log-probabilities.
STRONG = {**PAPER, "distill": "logits"}


def _recipe(train: TrainConfig) -> dict[str, Any]:
    return {name: getattr(train, name) for name in PAPER}


@pytest.mark.parametrize("strategy", [s for s in KNOCKOFF_STRATEGIES if s != "random"])
def test_knockoff_distils_logits_unless_told_otherwise(strategy: str) -> None:
    config = for_attack("knockoff", strategy=strategy)
    assert config.distill is None and config.resolved_distill == "logits"
    assert _recipe(config.train_config()) == STRONG


def test_the_default_knockoff_is_kcenter_distilling_logits() -> None:
    config = for_attack("knockoff")
    assert config.strategy == "kcenter" and _recipe(config.train_config()) == STRONG


def test_random_knockoff_trains_exactly_as_the_paper() -> None:
    config = for_attack("knockoff", strategy="random")
    train = config.train_config()
    assert config.resolved_distill == "probs"
    assert train == TrainConfig(
        epochs=30, batch_size=128, optimizer="adam", lr=None, seed=0, device="auto", **PAPER
    )
    # The same training as an attack whose options never depended on a strategy.
    assert train == for_attack("copycat").train_config()


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        ({"strategy": "random", "distill": "logits"}, {"distill": "logits"}),
        ({"distill": "probs"}, {"distill": "probs"}),
        ({"strategy": "entropy", "distill": "probs"}, {"distill": "probs"}),
        # The other training options are the strategy's whatever it is, and taken as given.
        ({"strategy": "random", "augment": True}, {"augment": True}),
        (
            {"strategy": "stealth", "val_fraction": 0.2, "patience": 3},
            {"val_fraction": 0.2, "patience": 3},
        ),
        ({"strategy": "random", "unlabeled_weight": 0.5}, {"unlabeled_weight": 0.5}),
        ({"unlabeled_weight": 0.25, "augment": True}, {"unlabeled_weight": 0.25, "augment": True}),
    ],
)
def test_a_training_option_given_wins_over_the_strategys(options: dict, changed: dict) -> None:
    recipe = PAPER if options.get("strategy") == "random" else STRONG
    train = for_attack("knockoff", **options).train_config()
    assert _recipe(train) == {**recipe, **changed}
    # Recorded as given, and resolved again the same way from the record.
    again = parse_attack_config(json.loads(json.dumps(for_attack("knockoff", **options).to_dict())))
    assert again.train_config() == train


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
# Added since (issue 14): training options on every command, and knockoff's strategies' own.
for _attack, _flags in CLI_OPTIONS.items():
    _flags |= {"--distill"} | ({"--unlabeled-weight"} if _attack != "jbda" else set())
CLI_OPTIONS["knockoff"] |= {"--rounds", "--initial", "--candidates", "--round-epochs", "--public",
                             "--keep"}  # fmt: skip


def _command(attack: str):
    return typer.main.get_command(app).commands["attack"].commands[attack]


@pytest.mark.parametrize("attack", CLI_OPTIONS)
def test_each_command_offers_exactly_its_options(attack: str) -> None:
    command = _command(attack)
    offered = {flag for p in command.params for flag in [*p.opts, *p.secondary_opts]}
    assert offered == CLI_OPTIONS[attack]
    description = inspect.getdoc(type(for_attack(attack)))  # the attack's own, as help
    assert command.help is not None and inspect.cleandoc(command.help) == description
    # Rich lays the help out at the width in COLUMNS (click's terminal_width does not reach it);
    # at 80 columns it cuts the longest flags short ("--unlabeled-wei…").
    wide = {"COLUMNS": "200"}
    help_text = CliRunner().invoke(app, ["attack", attack, "--help"], env=wide).output
    assert all(flag in help_text for flag in CLI_OPTIONS[attack])


@pytest.mark.parametrize(
    ("attack", "option", "default"),
    [
        ("knockoff", "checkpoints", "500,1000,2000,5000,10000"),
        ("knockoff", "out", "runs/knockoff"),
        ("knockoff", "transfer", "natural-crops"),
        ("knockoff", "strategy", "kcenter"),
        ("knockoff", "distill", None),  # the strategy's own
        ("knockoff", "unlabeled_weight", 0.0),
        ("knockoff", "rounds", 5),
        ("knockoff", "initial", 0.2),
        ("knockoff", "candidates", 8000),
        ("knockoff", "round_epochs", 15),
        ("knockoff", "public", "fashion-mnist:pool"),
        ("knockoff", "keep", 0.25),
        ("realistic", "distill", "probs"),
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
        (["knockoff", "--strategy", "smart"], "one of random, adaptive, kcenter, entropy,"),
        (["knockoff", "--cover", "mnist"], "the kcenter strategy sends no cover traffic"),
        (["knockoff", "--rounds", "0"], "rounds must be at least 1"),
        (["knockoff", "--initial", "1"], "initial is a share of the budget, in (0, 1)"),
        (["knockoff", "--candidates", "0"], "candidates must be at least 1"),
        (["knockoff", "--keep", "0"], "keep is a share of the transfer set, in (0, 1]"),
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
