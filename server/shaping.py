"""Output granularity: how much of the probability vector an answer reveals.

The paper's second claim is that Knockoff nets is limited by the API's granularity, so the
deployment (and each API key) chooses among:

``probs``      the full vector;
``topk:K``     the K most probable classes with their probabilities;
``round:D``    probabilities rounded to D decimals;
``label``      the top-1 class only, with no score.

``topk`` and ``round`` compose (``topk:3,round:2``). Scores are listed highest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlaas.wire import ClassScore, Prediction


@dataclass(frozen=True)
class Granularity:
    top_k: int | None = None
    decimals: int | None = None
    label_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> Granularity:
        terms = [t.strip().lower() for t in spec.split(",") if t.strip()]
        if not terms:
            raise ValueError("granularity is empty; use probs, label, topk:K or round:D")
        seen: set[str] = set()
        top_k = decimals = None
        label_only = False
        for term in terms:
            name, _, arg = term.partition(":")
            if name in seen:
                raise ValueError(f"granularity {spec!r} names {name!r} twice")
            seen.add(name)
            if name in ("probs", "label"):
                if arg:
                    raise ValueError(f"{name!r} takes no argument")
                label_only = name == "label"
            elif name in ("topk", "round"):
                if not arg.isdigit():
                    raise ValueError(f"{name!r} needs a non-negative integer, as in {name}:3")
                value = int(arg)
                if name == "topk":
                    if value < 1:
                        raise ValueError("topk needs K >= 1")
                    top_k = value
                else:
                    if value > 8:
                        raise ValueError("round:D takes D from 0 to 8")
                    decimals = value
            else:
                raise ValueError(
                    f"unknown granularity {term!r}; use probs, label, topk:K or round:D"
                )
        if len(terms) > 1 and seen & {"probs", "label"}:
            raise ValueError(f"{'probs' if 'probs' in seen else 'label'!r} stands alone")
        return cls(top_k=top_k, decimals=decimals, label_only=label_only)

    def __str__(self) -> str:
        if self.label_only:
            return "label"
        parts = []
        if self.top_k is not None:
            parts.append(f"topk:{self.top_k}")
        if self.decimals is not None:
            parts.append(f"round:{self.decimals}")
        return ",".join(parts) or "probs"

    def shape(
        self, probs: np.ndarray, classes: list[str], query_ids: list[str]
    ) -> list[Prediction]:
        """Turn a batch of probability vectors into the answers this granularity allows.

        The top-1 label always comes from the unrounded vector, so rounding can never change
        which class the API names.
        """
        labels = probs.argmax(axis=1)
        predictions = []
        for row, label, query_id in zip(probs, labels, query_ids, strict=True):
            scores = None
            if not self.label_only:
                # Stable sort of -p: highest first, ties broken by class index.
                order = np.argsort(-row, kind="stable")
                if self.top_k is not None:
                    order = order[: self.top_k]
                values = row[order].astype(np.float64)
                if self.decimals is not None:
                    values = np.round(values, self.decimals)
                scores = [
                    ClassScore(index=int(i), name=classes[i], prob=float(v))
                    for i, v in zip(order, values, strict=True)
                ]
            predictions.append(
                Prediction(
                    query_id=query_id,
                    label=int(label),
                    label_name=classes[int(label)],
                    scores=scores,
                )
            )
        return predictions
