"""Experiment configuration: a matrix of victims, API granularities, defenses, attackers, seeds.

A YAML file is parsed into :class:`ExperimentConfig`; :meth:`ExperimentConfig.cells` expands
the matrix into :class:`Cell` objects, each one attacker against one victim behind one defense
at one granularity for one seed, with a stable identifier (the directory of its record);
:meth:`ExperimentConfig.groups` gathers them by the server process they share.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

# PyYAML has no inline types, and its stubs (types-PyYAML) are no dependency of this project.
# mypy reports that here, or not at all when it met yaml first inside pydantic-settings (which
# depends on the order it reads the tree in): hence unused-ignore beside import-untyped.
import yaml  # type: ignore[import-untyped, unused-ignore]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlaas.shifts import HELD_OUT_SHIFTS, parse_shifts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VictimSpec(_Strict):
    name: str
    dataset: str = "fashion-mnist"
    arch: str = "cnn-small"
    pretrained: str | None = None
    epochs: int = 3
    input_shape: str | None = None
    train_size: int | None = None
    test_set: str | None = None
    """Where attacks are measured; default ``<dataset>:test``."""
    directory: str | None = None
    """A victim directory of its own, shared by every seed and run (``mlaas demo`` reuses
    ``var/victims/fashion``): used as it is where it holds a victim, else trained into.
    Default: ``OUT/victims/NAME-sSEED``."""

    @property
    def evaluation_set(self) -> str:
        return self.test_set or f"{self.dataset}:test"


class DefenseSpec(_Strict):
    name: str
    detectors: list[str] = Field(default_factory=list)
    policy: Literal["monitor", "block", "deceive"] = "monitor"
    perturbation: str = "none"
    deceive: str | None = None

    @field_validator("detectors")
    @classmethod
    def _default_set(cls, value: list[str]) -> list[str]:
        """``default`` stands for the set measured best out of sample, as in ``mlaas serve``."""
        if "default" not in value:
            return value
        from defense.detectors import DEFAULT_DETECTORS

        at = value.index("default")
        return [*value[:at], *(d for d in DEFAULT_DETECTORS if d not in value), *value[at + 1 :]]


class AttackerSpec(BaseModel):
    """An attacker: its name, attack and budgets, and beside them any option of that attack
    (``attacker.config``: ``transfer``, ``strategy``, ``epochs``...). The options are checked
    against the attack's own when the file is loaded, an option it does not take refused, and
    completed with the attack's defaults, which each cell's record holds. ``transfer`` may
    hold ``{dataset}``, the victim's data set."""

    model_config = ConfigDict(extra="allow")  # the attack's options, checked below

    name: str
    attack: Literal["knockoff", "realistic", "copycat", "jbda"]
    budgets: list[int] = Field(min_length=1)
    """Checkpoints; the largest is the budget."""

    # Attack options each cell sets: from budgets, the victim's test set, the experiment's
    # eval_size, seeds and device.
    _from_the_cell: ClassVar[frozenset[str]] = frozenset(
        {"budget", "checkpoints", "test_set", "eval_size", "seed", "device"}
    )

    @property
    def budget(self) -> int:
        return max(self.budgets)

    def attack_options(self) -> dict[str, Any]:
        """The attack's options but those of the cell: the attacker's, with its budgets
        (JBDA measures after each of its rounds: it takes no checkpoints)."""
        from attacker.config import CONFIG_CLASSES

        options = {**(self.model_extra or {}), "budget": self.budget}
        if "checkpoints" in CONFIG_CLASSES[self.attack].model_fields:
            options["checkpoints"] = sorted(self.budgets)
        return options

    @model_validator(mode="after")
    def _options_of_the_attack(self) -> AttackerSpec:
        from attacker.config import for_attack

        from_the_cell = sorted(self._from_the_cell & (self.model_extra or {}).keys())
        if from_the_cell:
            raise ValueError(
                f"attacker {self.name!r}: the experiment sets {', '.join(from_the_cell)} "
                "(from budgets, the victims, eval_size, seeds, device), not an attacker"
            )
        try:
            config = for_attack(self.attack, **self.attack_options())
        except ValueError as exc:
            raise ValueError(f"attacker {self.name!r}: {exc}") from exc
        # Every option at its value, defaults included: each cell's record (and id) says what ran.
        for option, value in config.to_dict().items():
            if option not in self._from_the_cell and option != "attack":
                setattr(self, option, value)
        return self


class BenignSpec(_Strict):
    clients: int = 3
    queries: int = 300
    shifts: list[str] = Field(default_factory=lambda: ["mild"], min_length=1)
    """Benign-shift families (mlaas.shifts), assigned to the clients in turn; ``held-out``
    stands for those no default detector calibration sees."""

    @field_validator("shifts")
    @classmethod
    def _known_shifts(cls, value: list[str]) -> list[str]:
        return parse_shifts(
            [s for name in value for s in (HELD_OUT_SHIFTS if name == "held-out" else [name])]
        )


class ExperimentConfig(_Strict):
    name: str
    victims: list[VictimSpec] = Field(min_length=1)
    granularities: list[str] = Field(default_factory=lambda: ["probs"], min_length=1)
    defenses: list[DefenseSpec] = Field(
        default_factory=lambda: [DefenseSpec(name="none")], min_length=1
    )
    attackers: list[AttackerSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    benign: BenignSpec = Field(default_factory=BenignSpec)
    eval_size: int | None = 2000
    device: str = "auto"
    side_by_side: bool = False
    """All attackers of a group at once, each under a key named after it, with the benign
    clients querying at the same time, one server per victim, defense, granularity and seed
    (what ``mlaas demo`` shows). Default: one attacker after another, the benign clients
    first, one server per victim, defense and seed."""
    run_name: str = "{id}"
    """Each attack's run directory under ``OUT/runs/``: a template of ``{id}``, ``{victim}``,
    ``{defense}``, ``{granularity}``, ``{attacker}`` and ``{seed}`` that tells every cell
    apart."""

    @field_validator("granularities")
    @classmethod
    def _granularities(cls, values: list[str]) -> list[str]:
        from server.shaping import Granularity

        return [str(Granularity.parse(v)) for v in values]

    @model_validator(mode="after")
    def _unique_names(self) -> ExperimentConfig:
        for kind in ("victims", "defenses", "attackers"):
            names = [item.name for item in getattr(self, kind)]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} need unique names, got {names}")
        if self.side_by_side:
            reserved = [a.name for a in self.attackers if a.name == "experimenter"]
            reserved += [a.name for a in self.attackers if a.name.startswith("benign-")]
            if reserved:  # side by side, an attacker's key is named after it
                raise ValueError(f"attacker names {reserved} are the experimenter's or benign keys")
        return self

    @model_validator(mode="after")
    def _run_names_apart(self) -> ExperimentConfig:
        try:
            names = [self.run_dir(cell) for cell in self.cells()]
        except (KeyError, IndexError) as exc:
            raise ValueError(f"run_name {self.run_name!r} has an unknown field {exc}") from exc
        if len(set(names)) != len(names):
            raise ValueError(f"run_name {self.run_name!r} gives two cells one run directory")
        return self

    @classmethod
    def load(cls, path: Path) -> ExperimentConfig:
        return cls.model_validate(parse_yaml(Path(path).read_text(), str(path)))

    def dump(self) -> str:
        """The configuration as YAML that :meth:`load` reads back."""
        return str(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    def cells(self) -> list[Cell]:
        return [
            Cell(victim=v, granularity=g, defense=d, attacker=a, seed=s)
            for s in self.seeds
            for v in self.victims
            for d in self.defenses
            for g in self.granularities
            for a in self.attackers
        ]

    def groups(self) -> list[tuple[str, list[Cell]]]:
        """The cells by the server they share, each group with its identifier, in order:
        one victim, defense and seed (and granularity, side by side) per group."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.cells():
            granularity = [_slug(cell.granularity)] if self.side_by_side else []
            parts = [cell.victim.name, cell.defense.name, *granularity, str(cell.seed)]
            groups.setdefault("--".join(parts), []).append(cell)
        return list(groups.items())

    def run_dir(self, cell: Cell) -> str:
        """The name of the cell's attack run directory under ``OUT/runs/``."""
        return self.run_name.format(
            id=cell.id,
            victim=cell.victim.name,
            defense=cell.defense.name,
            granularity=_slug(cell.granularity),
            attacker=cell.attacker.name,
            seed=cell.seed,
        )


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """A configuration's YAML as the mapping :class:`ExperimentConfig` validates."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a mapping at the top level")
    return data


def _slug(granularity: str) -> str:
    """A granularity as part of a file name: ``topk:3,round:2`` -> ``topk3-round2``."""
    return granularity.replace(":", "").replace(",", "-")


class Cell(_Strict):
    victim: VictimSpec
    granularity: str
    defense: DefenseSpec
    attacker: AttackerSpec
    seed: int

    @property
    def id(self) -> str:
        """Readable and stable: names plus a digest of the full specification, so an edited
        specification is a new cell rather than a stale record."""
        spec = json.dumps(self.model_dump(), sort_keys=True)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        return (
            f"{self.victim.name}--{self.defense.name}--{_slug(self.granularity)}"
            f"--{self.attacker.name}--s{self.seed}--{digest}"
        )
