"""Experiment configuration: a matrix of victims, API granularities, defenses, attackers, seeds.

A YAML file is parsed into :class:`ExperimentConfig`; :meth:`ExperimentConfig.cells` expands
the matrix into :class:`Cell` objects, each one attacker against one victim behind one defense
at one granularity for one seed, with a stable identifier (the directory of its record).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlaas.shifts import parse_shifts


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

    @property
    def evaluation_set(self) -> str:
        return self.test_set or f"{self.dataset}:test"


class DefenseSpec(_Strict):
    name: str
    detectors: list[str] = Field(default_factory=list)
    policy: Literal["monitor", "block", "deceive"] = "monitor"
    perturbation: str = "none"
    deceive: str | None = None


class AttackerSpec(_Strict):
    name: str
    attack: Literal["knockoff", "realistic", "copycat", "jbda"]
    budgets: list[int] = Field(min_length=1)
    """Checkpoints; the largest is the budget."""
    transfer: str | None = None
    strategy: Literal["random", "adaptive"] = "random"
    reward: str = "all"
    arch: str = "cnn-small"
    pretrained: str | None = None
    epochs: int | None = None
    seed_size: int | None = None

    @property
    def budget(self) -> int:
        return max(self.budgets)


class BenignSpec(_Strict):
    clients: int = 3
    queries: int = 300
    shifts: list[str] = Field(default_factory=lambda: ["mild"], min_length=1)
    """Benign-shift families (mlaas.shifts), assigned to the clients in turn."""

    @field_validator("shifts")
    @classmethod
    def _known_shifts(cls, value: list[str]) -> list[str]:
        return parse_shifts(value)


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
        return self

    @classmethod
    def load(cls, path: Path) -> ExperimentConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        return cls.model_validate(data)

    def cells(self) -> list[Cell]:
        return [
            Cell(victim=v, granularity=g, defense=d, attacker=a, seed=s)
            for s in self.seeds
            for v in self.victims
            for d in self.defenses
            for g in self.granularities
            for a in self.attackers
        ]


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
        granularity = self.granularity.replace(":", "").replace(",", "-")
        return (
            f"{self.victim.name}--{self.defense.name}--{granularity}--{self.attacker.name}"
            f"--s{self.seed}--{digest}"
        )

    @property
    def group(self) -> tuple[str, str, int]:
        """Cells of one group share a server process: same victim, defense and seed."""
        return (self.victim.name, self.defense.name, self.seed)
