"""What each attack takes: one pydantic model per attack, and :data:`AttackConfig`, their union.

Every attack's model holds the options all attacks share (:class:`BaseAttackConfig`) and its
own, with that attack's defaults. An option the attack does not take is refused rather than
ignored: ``for_attack("jbda", cover="natural-crops")`` raises :class:`AttackConfigError`
("the jbda attack takes no option 'cover'").

This module imports no torch: the ``mlaas attack`` commands build their options from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
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

    @model_validator(mode="after")
    def _cover_rule(self) -> Self:
        if not 0.0 <= self.cover_rate < 1.0:
            raise ValueError("cover_rate is the share of the budget spent on cover, in [0, 1)")
        if self.cover_rate > 0 and not self.cover:
            raise ValueError("cover_rate needs a cover data set (--cover)")
        return self


class KnockoffConfig(SampledAttackConfig):
    """Knockoff nets: natural images from another distribution, labelled by the victim."""

    attack: Literal["knockoff"] = "knockoff"
    strategy: str = Field("random", description="random or adaptive (gradient bandit)")
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
        if strategy not in ("random", "adaptive"):
            raise ValueError(f"strategy must be random or adaptive, not {strategy!r}")
        return strategy

    @model_validator(mode="after")
    def _no_cover_when_adaptive(self) -> Self:
        if self.strategy == "adaptive" and (self.cover or self.cover_rate):
            raise ValueError("the adaptive strategy sends no cover traffic; use strategy random")
        return self

    @property
    def trains_on_labels(self) -> bool:
        return self.label_only


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
_ADAPTER: TypeAdapter[AttackConfig] = TypeAdapter(AttackConfig)


def parse_attack_config(data: Mapping[str, Any]) -> AttackConfig:
    """The attack named by ``data["attack"]``, with ``data``'s options (``to_dict()``'s
    output parses back to an equal configuration)."""
    attack = data.get("attack")
    if attack not in ATTACKS:
        raise AttackConfigError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    try:
        return _ADAPTER.validate_python(dict(data))
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
