"""What each attack takes: one pydantic model per attack, and :data:`AttackConfig`, their union.

Every attack's model holds the options all attacks share (:class:`BaseAttackConfig`) and its
own, with that attack's defaults. An option the attack does not take is refused rather than
ignored: ``for_attack("jbda", cover="natural-crops")`` raises :class:`AttackConfigError`
("the jbda attack takes no option 'cover'").

This module imports no torch: the ``mlaas attack`` commands build their options from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from mlaas.training import TrainConfig

DEFAULT_CHECKPOINTS = (500, 1000, 2000, 5000, 10000)
_TRANSFER = "Transfer set: a registered data set or an ImageFolder path"


class AttackConfigError(ValueError):
    """Options an attack does not take, or bad values; the message names each and the attack."""


class BaseAttackConfig(BaseModel):
    """The options of every attack: its budget, transfer set, substitute and its training,
    and where the substitute is measured."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(5000, description="Hard limit on images the victim answers")
    transfer: str = Field("natural-crops", description=_TRANSFER)
    transfer_size: int | None = Field(None, description="Seeded subset of the transfer set")
    arch: str = Field(
        "cnn-small", description="Substitute architecture (independent of the victim's)"
    )
    pretrained: str | None = Field(None, description="'imagenet' for a pretrained substitute")
    epochs: int = Field(30, description="Substitute training epochs per checkpoint")
    train_batch_size: int = Field(128, description="Substitute training batch size")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Substitute optimizer")
    lr: float | None = Field(None, description="Peak learning rate; none: the optimizer's own")
    augment: bool = Field(False, description="Random shifts and flips while training")
    distill: Literal["probs", "logits"] = Field(
        "probs", description="Match the answers' probabilities or their log-probabilities"
    )
    val_fraction: float = Field(
        0.0, description="Share of the answers held out to stop training early"
    )
    patience: int | None = Field(None, description="Early-stopping patience (epochs)")
    test_set: str = Field(
        "fashion-mnist:test", description="Where accuracy and fidelity are measured"
    )
    eval_size: int | None = Field(None, description="Seeded subset of the test set")
    seed: int = Field(0, description="Seeds every random choice")
    device: str = Field("auto", description="Where the substitute trains: auto, cpu, cuda...")

    @field_validator("budget")
    @classmethod
    def _at_least_one_query(cls, budget: int) -> int:
        if budget < 1:
            raise ValueError("the budget must be at least one query")
        return budget

    @property
    def trains_on_labels(self) -> bool:
        """Whether the substitute learns the victim's top-1 labels rather than its scores."""
        return False

    @property
    def resolved_distill(self) -> Literal["probs", "logits"]:
        """What the substitute matches in probability answers (the option, once resolved)."""
        return self.distill

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def train_config(self) -> TrainConfig:
        from mlaas.training import TrainConfig  # here, not above: it imports torch

        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.train_batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            augment=self.augment,
            distill=self.resolved_distill,
            seed=self.seed,
            device=self.device,
            val_fraction=self.val_fraction,
            patience=self.patience,
        )


class SampledAttackConfig(BaseAttackConfig):
    """Attacks that query transfer images, training the substitute at checkpoints of the
    budget; in a seeded random order they can interleave cover traffic (JBDA makes its own
    images and measures after each of its rounds instead)."""

    checkpoints: list[int] = Field(
        default_factory=lambda: list(DEFAULT_CHECKPOINTS),
        description="Budgets at which the substitute is trained and measured",
    )
    cover: str | None = Field(
        None, description="Cover traffic data set, interleaved with the attack's queries"
    )
    cover_rate: float = Field(0.0, description="Share of the budget spent on cover traffic")
    unlabeled_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of pseudo-labels on the transfer images not queried (0: off)",
    )

    def train_config(self) -> TrainConfig:
        return replace(super().train_config(), unlabeled_weight=self.unlabeled_weight)

    @model_validator(mode="after")
    def _cover_rule(self) -> Self:
        if not 0.0 <= self.cover_rate < 1.0:
            raise ValueError("cover_rate is the share of the budget spent on cover, in [0, 1)")
        if self.cover_rate > 0 and not self.cover:
            raise ValueError("cover_rate needs a cover data set (--cover)")
        return self


KNOCKOFF_STRATEGIES = ("random", "adaptive", "kcenter", "entropy", "entropy-kcenter", "stealth")
ACTIVE_STRATEGIES = ("kcenter", "entropy", "entropy-kcenter")
DEFAULT_STRATEGY = "kcenter"


class KnockoffConfig(SampledAttackConfig):
    """Knockoff nets: natural images from another distribution, labelled by the victim.

    ``random`` is the paper's attack exactly: a random sample of the transfer set, the
    substitute trained on the answered probabilities. The other strategies choose what to
    query: ``adaptive``, the paper's gradient bandit; ``kcenter`` (the default), ``entropy``
    and ``entropy-kcenter``, rounds of active learning as in ActiveThief; ``stealth``, k-center
    rounds among the images a proxy of the provider's detector takes for in-domain. They train
    the substitute on the answers' log-probabilities (``distill="logits"``), the victim's
    logits up to a constant; set ``distill`` to choose.
    """

    attack: Literal["knockoff"] = "knockoff"
    strategy: str = Field(DEFAULT_STRATEGY, description=f"One of {', '.join(KNOCKOFF_STRATEGIES)}")
    # The one training option whose default depends on the strategy (None: the strategy's
    # own, which train_config resolves; the narrower base type holds for every other attack).
    distill: Literal["probs", "logits"] | None = Field(  # type: ignore[assignment]
        None,
        description="Match the answers' probabilities or log-probabilities; "
        "none: probs with strategy random (the paper), logits otherwise",
    )
    # Active learning (kcenter, entropy, entropy-kcenter; stealth runs k-center rounds among
    # the images it keeps).
    rounds: int = Field(5, description="active: selection rounds after the random initial set")
    initial: float = Field(0.2, description="active: share of the budget queried at random first")
    candidates: int = Field(
        8000, description="active: unqueried transfer images the substitute scores per round"
    )
    round_epochs: int = Field(
        15, description="active: epochs of the substitutes that only choose the next round"
    )
    # Stealth: a proxy of the provider's out-of-distribution detector.
    public: str = Field(
        "fashion-mnist:pool",
        description="stealth: public in-domain images its proxy detector learns from (not queried)",
    )
    keep: float = Field(
        0.25, description="stealth: share of the transfer set the proxy passes as in-domain"
    )
    # Adaptive (the paper's bandit).
    reward: str = Field("all", description="adaptive reward: cert, div, loss or all")
    clusters: int = Field(20, description="adaptive actions when the set has no labels")
    bandit_lr: float = Field(0.1, description="adaptive: the bandit's learning rate")
    step: int = Field(32, description="adaptive: images per bandit step")
    retrain_every: int = Field(
        1000, description="adaptive: queries between the substitutes its loss reward uses"
    )
    label_only: bool = Field(False, description="Train on top-1 labels only")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy not in KNOCKOFF_STRATEGIES:
            raise ValueError(
                f"strategy must be one of {', '.join(KNOCKOFF_STRATEGIES)}, not {strategy!r}"
            )
        return strategy

    @model_validator(mode="after")
    def _strategy_rules(self) -> Self:
        if self.strategy != "random" and (self.cover or self.cover_rate):
            raise ValueError(
                f"the {self.strategy} strategy sends no cover traffic; use strategy random"
            )
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if not 0.0 < self.initial < 1.0:
            raise ValueError("initial is a share of the budget, in (0, 1)")
        if self.candidates < 1:
            raise ValueError("candidates must be at least 1")
        if self.round_epochs < 1:
            raise ValueError("round_epochs must be at least 1")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError("keep is a share of the transfer set, in (0, 1]")
        return self

    @property
    def paper_recipe(self) -> bool:
        """Whether the substitute learns as in the paper (the random strategy): from the
        answered probabilities, not their logarithms."""
        return self.strategy == "random"

    @property
    def trains_on_labels(self) -> bool:
        return self.label_only

    @property
    def resolved_distill(self) -> Literal["probs", "logits"]:
        return self.distill or ("probs" if self.paper_recipe else "logits")


class RealisticConfig(SampledAttackConfig):
    """Atli et al.'s realistic adversary: in-domain public data and strong training choices
    (augmentation, LR schedule, early stopping on a split of its own queries)."""

    attack: Literal["realistic"] = "realistic"
    transfer: str = Field("fashion-mnist:pool", description=_TRANSFER)
    epochs: int = Field(60, description="Most epochs; early stopping ends sooner")
    augment: bool = Field(True, description="Random shifts and flips while training")
    val_fraction: float = Field(
        0.1, description="Share of the answers held out to stop training early"
    )
    patience: int | None = Field(8, description="Early-stopping patience (epochs)")


class CopycatConfig(SampledAttackConfig):
    """Copycat CNN: non-problem-domain images, trained on the victim's labels only."""

    attack: Literal["copycat"] = "copycat"
    label_only: Literal[True] = Field(True, description="Copycat trains on top-1 labels only")

    @property
    def trains_on_labels(self) -> bool:
        return self.label_only


class JbdaConfig(BaseAttackConfig):
    """Papernot et al.'s JBDA: a small seed set, doubled each round along the substitute's
    Jacobian, every round queried through the API."""

    attack: Literal["jbda"] = "jbda"
    transfer: str = Field("fashion-mnist:pool", description="Where the seed set comes from")
    seed_size: int = Field(150, description="Initial in-domain images")
    jbda_lambda: float = Field(0.1, description="Step size, in [0, 1] pixels")
    jbda_tau: int = Field(3, description="Rounds between sign flips")

    @model_validator(mode="after")
    def _seed_set_within_budget(self) -> Self:
        if self.seed_size > self.budget:
            raise ValueError(f"the JBDA seed set ({self.seed_size}) exceeds the budget")
        return self


AttackConfig: TypeAlias = Annotated[
    KnockoffConfig | RealisticConfig | CopycatConfig | JbdaConfig,
    Field(discriminator="attack"),
]
CONFIG_CLASSES: dict[str, type[BaseAttackConfig]] = {
    "knockoff": KnockoffConfig,
    "realistic": RealisticConfig,
    "copycat": CopycatConfig,
    "jbda": JbdaConfig,
}
ATTACKS = tuple(CONFIG_CLASSES)


class _AnyAttack(RootModel[AttackConfig]):
    """Parses the union by its discriminator (a RootModel, which type checkers follow)."""


def parse_attack_config(data: Mapping[str, Any]) -> AttackConfig:
    """The attack named by ``data["attack"]``, with ``data``'s options (``to_dict()``'s
    output parses back to an equal configuration)."""
    attack = data.get("attack")
    if attack not in ATTACKS:
        raise AttackConfigError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    try:
        return _AnyAttack.model_validate(dict(data)).root
    except ValidationError as exc:
        raise AttackConfigError(_explain(exc, str(attack))) from exc


def for_attack(attack: str, **options: Any) -> AttackConfig:
    """``attack`` with ``options``, every other option at that attack's default."""
    return parse_attack_config({**options, "attack": attack})


def _explain(exc: ValidationError, attack: str) -> str:
    refused: list[str] = []
    problems: list[str] = []
    for error in exc.errors():
        option = ".".join(str(part) for part in error["loc"][1:])  # loc[0]: the attack's tag
        if error["type"] == "extra_forbidden":
            refused.append(repr(option))
            continue
        # A validator's own message, without pydantic's "Value error, " before it.
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        problems.append(f"{attack} {option}: {message}" if option else f"{attack}: {message}")
    if refused:
        plural = "s" if len(refused) > 1 else ""
        problems.insert(0, f"the {attack} attack takes no option{plural} {', '.join(refused)}")
    return "; ".join(problems)
