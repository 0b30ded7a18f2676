"""Which transfer-set images to query next: Knockoff nets' adaptive bandit, and active learning.

The adaptive strategy is the gradient bandit of Orekondy et al. (Knockoff Nets, CVPR 2019):
actions are groups of transfer images (the set's labels where it has them, else k-means
clusters of the substitute's features); a softmax policy over action preferences picks a group,
an image is drawn from it, and the victim's answer yields a reward that moves the preferences.

The active strategies are ActiveThief's (Pal et al., AAAI 2020): see :func:`select_active`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from attacker.config import ACTIVE_STRATEGIES

REWARDS = ("cert", "div", "loss", "all")
_EPS = 1e-12


def softmax(preferences: np.ndarray) -> np.ndarray:
    """A softmax that cannot overflow: shift by the maximum first."""
    shifted = preferences - preferences.max()
    weights = np.exp(shifted)
    return weights / weights.sum()


def certainty_reward(probs: np.ndarray) -> np.ndarray:
    """Margin between the top two probabilities of each answer: confident answers teach."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def diversity_reward(probs: np.ndarray, recent_mean: np.ndarray | None) -> np.ndarray:
    """How far each answer reaches beyond the recent answers' mean (new classes teach)."""
    if recent_mean is None:
        return np.ones(len(probs))
    return np.maximum(probs - recent_mean, 0.0).sum(axis=1)


def loss_reward(probs: np.ndarray, substitute_probs: np.ndarray) -> np.ndarray:
    """Cross-entropy of the substitute against the victim: where the copy is still wrong."""
    return -(probs * np.log(np.clip(substitute_probs, _EPS, 1.0))).sum(axis=1)


@dataclass
class RunningStats:
    """Mean and variance over all rewards seen (Welford), to put rewards on one scale."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: np.ndarray) -> None:
        for value in np.asarray(values, dtype=np.float64).ravel():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        std = np.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
        return (np.asarray(values, dtype=np.float64) - self.mean) / max(std, 1e-8)


@dataclass
class GradientBandit:
    """Preferences over actions, softmax policy, reward baseline (Sutton & Barto 2.8)."""

    actions: int
    lr: float = 0.1
    preferences: np.ndarray = field(init=False)
    baseline: float = 0.0
    steps: int = 0

    def __post_init__(self) -> None:
        if self.actions < 1:
            raise ValueError("a bandit needs at least one action")
        self.preferences = np.zeros(self.actions)

    @property
    def policy(self) -> np.ndarray:
        return softmax(self.preferences)

    def update(self, action: int, reward: float) -> None:
        if not np.isfinite(reward):
            raise ValueError(f"non-finite reward {reward}")
        self.steps += 1
        self.baseline += (reward - self.baseline) / self.steps
        policy = self.policy
        advantage = reward - self.baseline
        self.preferences -= self.lr * advantage * policy
        self.preferences[action] += self.lr * advantage
        # Preferences are shift-invariant under softmax: keep them centred and bounded.
        self.preferences -= self.preferences.mean()
        np.clip(self.preferences, -50.0, 50.0, out=self.preferences)


class AdaptiveSampler:
    """Draws transfer-set indices action by action, without replacement."""

    def __init__(
        self,
        groups: np.ndarray,
        *,
        reward: str = "all",
        lr: float = 0.1,
        diversity_window: int = 100,
        seed: int = 0,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, not {reward!r}")
        self.reward = reward
        self._rng = np.random.default_rng(seed)
        labels = np.unique(groups)
        self.action_names = labels
        self._pools = [list(self._rng.permutation(np.flatnonzero(groups == g))) for g in labels]
        self.bandit = GradientBandit(len(labels), lr=lr)
        self._recent: deque[np.ndarray] = deque(maxlen=diversity_window)
        self._stats = {name: RunningStats() for name in ("cert", "div", "loss")}
        self.history: list[tuple[int, float]] = []

    def unqueried(self) -> np.ndarray:
        """Indices no action has drawn yet."""
        return np.array([i for pool in self._pools for i in pool], dtype=np.int64)

    def _available(self) -> np.ndarray:
        return np.array([len(pool) > 0 for pool in self._pools])

    def sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` indices and the action that drew each."""
        indices, actions = [], []
        for _ in range(count):
            available = self._available()
            if not available.any():
                break
            policy = self.bandit.policy * available
            action = int(self._rng.choice(len(policy), p=policy / policy.sum()))
            indices.append(self._pools[action].pop())
            actions.append(action)
        return np.array(indices, dtype=np.int64), np.array(actions, dtype=np.int64)

    def rewards(self, probs: np.ndarray, substitute_probs: np.ndarray | None) -> np.ndarray:
        recent = np.mean(self._recent, axis=0) if self._recent else None
        parts = {
            "cert": certainty_reward(probs),
            "div": diversity_reward(probs, recent),
        }
        if substitute_probs is not None:
            parts["loss"] = loss_reward(probs, substitute_probs)
        for row in probs:
            self._recent.append(row)
        if self.reward != "all":
            return parts.get(self.reward, parts["cert"])
        total = np.zeros(len(probs))
        for name, values in parts.items():  # each on its own running scale, then summed
            self._stats[name].update(values)
            total += self._stats[name].normalise(values)
        return total

    def update(self, actions: np.ndarray, rewards: np.ndarray) -> None:
        for action, reward in zip(actions, rewards, strict=True):
            self.bandit.update(int(action), float(reward))
            self.history.append((int(action), float(reward)))


# --------------------------------------------------------------------------- active learning
# ActiveThief (Pal et al., AAAI 2020): after a random seed set, the attack proceeds in rounds;
# each round the substitute trained on every answer so far scores the unqueried transfer images,
# and the next batch is the images it is least sure of (uncertainty), the ones farthest from
# everything already asked (k-center core set, Sener and Savarese 2018), or both.


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probs``."""
    clipped = np.clip(probs, _EPS, 1.0)
    return -(probs * np.log(clipped)).sum(axis=1)


def most_uncertain(probs: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` rows of highest entropy, most uncertain first (ties: lower
    position first, so the choice is deterministic)."""
    count = min(count, len(probs))
    return np.argsort(-entropy(probs), kind="stable")[:count]


def kcenter_greedy(
    candidates: np.ndarray, centers: np.ndarray, count: int, chunk: int = 1024
) -> np.ndarray:
    """Farthest-first traversal: ``count`` candidate positions, each the candidate farthest
    (Euclidean) from its nearest center, which then becomes a center itself.

    This is the greedy 2-approximation of the k-center problem ActiveThief uses to cover the
    transfer set; ``centers`` are the points already chosen (the queried images), possibly none.
    """
    count = min(count, len(candidates))
    candidates = np.asarray(candidates, dtype=np.float64)
    nearest = np.full(len(candidates), np.inf)
    for start in range(0, len(centers), chunk):
        block = np.asarray(centers[start : start + chunk], dtype=np.float64)
        nearest = np.minimum(nearest, _squared_distances(candidates, block).min(axis=1))
    chosen = np.empty(count, dtype=np.int64)
    for step in range(count):
        # With no centers yet every distance is infinite: argmax then takes the first candidate.
        pick = int(np.argmax(nearest))
        chosen[step] = pick
        nearest = np.minimum(nearest, ((candidates - candidates[pick]) ** 2).sum(axis=1))
        nearest[pick] = -np.inf  # never chosen twice, even among duplicates
    return chosen


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a**2).sum(axis=1)[:, None] + (b**2).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(squared, 0.0)


def select_active(
    strategy: str,
    candidate_probs: np.ndarray,
    queried_probs: np.ndarray,
    count: int,
    shortlist: int = 4,
) -> np.ndarray:
    """Positions (into the candidates) of the next ``count`` images to query.

    ``candidate_probs``: the substitute's probabilities on the unqueried candidates;
    ``queried_probs``: its probabilities on the images already queried (k-center's centers).
    ``entropy-kcenter``: uncertainty first, then diversity: k-center over the
    ``shortlist * count`` most uncertain candidates, so that a round does not spend itself on
    near-duplicates of one confusing image.
    """
    if strategy not in ACTIVE_STRATEGIES:
        raise ValueError(f"active strategy must be one of {', '.join(ACTIVE_STRATEGIES)}")
    if strategy == "entropy":
        return most_uncertain(candidate_probs, count)
    if strategy == "kcenter":
        return kcenter_greedy(candidate_probs, queried_probs, count)
    short = most_uncertain(candidate_probs, shortlist * count)
    return short[kcenter_greedy(candidate_probs[short], queried_probs, count)]
