"""The extraction attacks: what to query, and the substitute trained on the answers.

Each attack is a generator of checkpoints: it queries the victim through the
:class:`~attacker.client.ExtractionClient` up to the next checkpoint, yields the transfer data
gathered so far, and receives the substitute the runner trained on it (the adaptive strategy
and JBDA need that substitute to choose their next queries). Each attack's options are its
model in :mod:`attacker.config`.

* ``knockoff``  Knockoff nets (Orekondy et al.): natural images from another distribution,
                sampled at random (the paper), by the adaptive gradient bandit, in rounds of
                active learning (ActiveThief's k-center or uncertainty rules), or among the
                images a proxy of the provider's detector takes for in-domain (stealth).
* ``realistic`` Atli et al.'s realistic adversary: in-domain public data, strong training.
* ``copycat``   Copycat CNN (Correia-Silva et al.): non-problem-domain images, labels only.
* ``jbda``      Papernot et al.'s Jacobian-based dataset augmentation from a small seed set.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.cluster import KMeans

from attacker.client import Answers, ExtractionClient
from attacker.config import (
    AttackConfig,
    BaseAttackConfig,
    JbdaConfig,
    KnockoffConfig,
    SampledAttackConfig,
)
from attacker.strategies import AdaptiveSampler, select_active
from mlaas.datasets import ImageSet, load_dataset
from mlaas.images import InputShape, to_tensor
from mlaas.models import Classifier, build_model
from mlaas.training import TrainConfig, fit, predict_proba


@dataclass
class Checkpoint:
    """Transfer data at one point of an attack."""

    queries: int  # images the victim answered so far (cover included)
    images: np.ndarray  # uint8 (N, H, W, C): what the substitute trains on
    answers: Answers
    unlabeled: ImageSet | None = None  # transfer images not queried (semi-supervised training)
    selection_only: bool = False  # a substitute only to choose the next queries: not measured

    def targets(self, label_only: bool) -> np.ndarray:
        return self.answers.labels if label_only else self.answers.targets


AttackStream = Generator[Checkpoint, Classifier, None]


@dataclass
class Victim:
    """What the attacker knows of the victim: its public model card."""

    shape: InputShape
    num_classes: int


def build_substitute(config: BaseAttackConfig, victim: Victim) -> Classifier:
    torch.manual_seed(config.seed)
    return build_model(config.arch, victim.num_classes, victim.shape, pretrained=config.pretrained)


def train_substitute(
    config: BaseAttackConfig, victim: Victim, checkpoint: Checkpoint, progress: bool = False
) -> Classifier:
    """A substitute trained from scratch on the checkpoint's answers; one that only chooses the
    next queries (``selection_only``) trains for ``round_epochs`` on the answers alone."""
    model = build_substitute(config, victim)
    train = config.train_config()
    unlabeled = checkpoint.unlabeled
    if checkpoint.selection_only and isinstance(config, KnockoffConfig):
        train = replace(train, epochs=min(train.epochs, config.round_epochs), unlabeled_weight=0.0)
        unlabeled = None
    if train.val_fraction and len(checkpoint.images) * train.val_fraction < 1:
        train = replace(train, val_fraction=0.0, patience=None)
    fit(
        model,
        checkpoint.images,
        checkpoint.targets(config.trains_on_labels),
        train,
        progress=progress,
        description=f"substitute on {len(checkpoint.images)}",
        unlabeled=unlabeled,
    )
    return model


def checkpoint_schedule(config: SampledAttackConfig) -> list[int]:
    points = sorted({c for c in config.checkpoints if 0 < c < config.budget} | {config.budget})
    return points


def _concat(answers: Sequence[Answers], num_classes: int) -> Answers:
    if not answers:
        return Answers(np.zeros((0, num_classes), np.float32), np.zeros(0, np.int64), True)
    return Answers(
        np.concatenate([a.probs for a in answers]),
        np.concatenate([a.labels for a in answers]),
        all(a.hard for a in answers),
    )


class QueryPlan:
    """The order of queries: the attack's images, with cover traffic interleaved evenly."""

    def __init__(
        self, attack_indices: np.ndarray, cover_count: int, cover_size: int, seed: int
    ) -> None:
        rng = np.random.default_rng([seed, 7])
        total = len(attack_indices) + cover_count
        is_cover = np.zeros(total, dtype=bool)
        if cover_count:
            is_cover[np.round(np.linspace(0, total - 1, cover_count)).astype(int)] = True
        self.is_cover = is_cover
        self.index = np.empty(total, dtype=np.int64)
        self.index[~is_cover] = attack_indices
        self.index[is_cover] = rng.choice(cover_size, cover_count, replace=cover_count > cover_size)


def random_order(config: BaseAttackConfig, transfer: ImageSet) -> np.ndarray:
    """The seeded order in which the random strategies query the transfer set."""
    return np.random.default_rng(config.seed).permutation(len(transfer))


def sequence_attack(
    client: ExtractionClient,
    config: SampledAttackConfig,
    victim: Victim,
    transfer: ImageSet,
    cover: ImageSet | None,
    chunk: int = 1000,
) -> AttackStream:
    """Knockoff random, realistic and copycat: a seeded random order through the transfer set."""
    cover_count = round(config.budget * config.cover_rate) if cover is not None else 0
    attack_count = min(config.budget - cover_count, len(transfer))
    permutation = random_order(config, transfer)
    order = permutation[:attack_count]
    plan = QueryPlan(order, cover_count, len(cover) if cover is not None else 0, config.seed)
    total = len(plan.index)
    images: list[np.ndarray] = []
    answers: list[Answers] = []
    done = 0
    for point in [p for p in checkpoint_schedule(config) if p <= total] or [total]:
        while done < point:
            stop = min(point, done + chunk)
            window = slice(done, stop)
            covered = plan.is_cover[window]
            batch = np.empty((stop - done, *victim.shape.hwc), dtype=np.uint8)
            if (~covered).any():
                batch[~covered] = transfer.get_batch(plan.index[window][~covered])
            if covered.any() and cover is not None:
                batch[covered] = cover.get_batch(plan.index[window][covered])
            got = client.query(batch)
            keep = ~covered
            images.append(batch[keep])
            answers.append(
                Answers(got.probs[keep], got.labels[keep], got.hard)  # cover is not trained on
            )
            done = stop
        asked = int((~plan.is_cover[:done]).sum())  # transfer images queried so far
        unqueried = transfer.subset(np.sort(permutation[asked:]))
        yield Checkpoint(
            done, np.concatenate(images), _concat(answers, victim.num_classes), unqueried
        )


def _action_groups(transfer: ImageSet, config: KnockoffConfig, victim: Victim) -> np.ndarray:
    """The bandit's actions: the transfer set's labels, else k-means clusters of features."""
    if transfer.labels is not None:
        return np.asarray(transfer.labels)
    model = build_substitute(config, victim)
    features = []
    with torch.inference_mode():
        for start in range(0, len(transfer), 1024):
            batch = transfer.get_batch(np.arange(start, min(start + 1024, len(transfer))))
            features.append(model.features(to_tensor(batch)).numpy())
    clusters = min(config.clusters, len(transfer))
    kmeans = KMeans(n_clusters=clusters, n_init=3, random_state=config.seed)
    return kmeans.fit_predict(np.concatenate(features))


def adaptive_attack(
    client: ExtractionClient, config: KnockoffConfig, victim: Victim, transfer: ImageSet
) -> AttackStream:
    """Knockoff nets' adaptive strategy: a gradient bandit over groups of transfer images."""
    sampler = AdaptiveSampler(
        _action_groups(transfer, config, victim),
        reward=config.reward,
        lr=config.bandit_lr,
        seed=config.seed,
    )
    budget = min(config.budget, len(transfer))
    retrain = set(range(config.retrain_every, budget, config.retrain_every))
    yields = sorted({p for p in checkpoint_schedule(config) if p <= budget} | retrain | {budget})
    images: list[np.ndarray] = []
    answers: list[Answers] = []
    substitute: Classifier | None = None
    done = 0
    for point in yields:
        while done < point:
            indices, actions = sampler.sample(min(config.step, point - done))
            if len(indices) == 0:
                break
            batch = transfer.get_batch(indices)
            got = client.query(batch)
            substitute_probs = predict_proba(substitute, batch) if substitute is not None else None
            sampler.update(actions, sampler.rewards(got.probs, substitute_probs))
            images.append(batch)
            answers.append(got)
            done += len(indices)
        unqueried = transfer.subset(np.sort(sampler.unqueried()))
        substitute = yield Checkpoint(
            done, np.concatenate(images), _concat(answers, victim.num_classes), unqueried
        )


def active_attack(
    client: ExtractionClient,
    config: KnockoffConfig,
    victim: Victim,
    transfer: ImageSet,
    allowed: np.ndarray | None = None,
) -> AttackStream:
    """ActiveThief's rounds: a random initial set, then each round the latest substitute scores
    ``config.candidates`` unqueried images and the strategy picks the next ones to query.

    ``allowed``: the transfer-set indices the attack may query (all of them when None); the
    stealth strategy passes the ones its proxy detector takes for in-domain.
    """
    rng = np.random.default_rng(config.seed)
    pool = np.arange(len(transfer)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    pool = pool[rng.permutation(len(pool))]
    budget = min(config.budget, len(pool))
    initial = min(budget, max(1, round(budget * config.initial)))
    round_ends = np.linspace(initial, budget, config.rounds + 1).round().astype(int)
    measured = {p for p in checkpoint_schedule(config) if p <= budget} | {budget}
    yields = sorted(measured | set(round_ends.tolist()))
    queried = np.zeros(len(pool), dtype=bool)  # by position in pool
    answers: list[Answers] = []
    images: list[np.ndarray] = []
    substitute: Classifier | None = None
    done = 0
    for point in yields:
        while done < point:
            if done < initial or substitute is None:
                chosen = np.arange(done, min(point, initial))  # the seeded random start
            else:
                chosen = _choose_actively(
                    config, substitute, transfer, pool, queried, images, point - done, rng
                )
            for part in range(0, len(chosen), 1000):  # the client's chunk: progress, resume
                positions = chosen[part : part + 1000]
                batch = transfer.get_batch(pool[positions])
                answers.append(client.query(batch))
                images.append(batch)
                queried[positions] = True
            done += len(chosen)
        unqueried = transfer.subset(np.sort(pool[~queried]))
        substitute = yield Checkpoint(
            done,
            np.concatenate(images),
            _concat(answers, victim.num_classes),
            unqueried,
            selection_only=point not in measured,
        )


def _choose_actively(
    config: KnockoffConfig,
    substitute: Classifier,
    transfer: ImageSet,
    pool: np.ndarray,
    queried: np.ndarray,
    images: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions in ``pool`` of the next ``count`` images the active strategy asks about."""
    unqueried = np.flatnonzero(~queried)
    if len(unqueried) > config.candidates:  # score a seeded sample: the whole pool may be huge
        unqueried = np.sort(rng.choice(unqueried, config.candidates, replace=False))
    candidate_probs = predict_proba(substitute, transfer.get_batch(pool[unqueried]))
    queried_probs = predict_proba(substitute, np.concatenate(images))
    strategy = "kcenter" if config.strategy == "stealth" else config.strategy
    return unqueried[select_active(strategy, candidate_probs, queried_probs, count)]


PROXY_IMAGES = 5000
"""Images per side (public in-domain, transfer) the stealth strategy's proxy detector learns
from: two epochs on these separate the two sets, and more would only cost time."""


def stealth_pool(config: KnockoffConfig, victim: Victim, transfer: ImageSet) -> np.ndarray:
    """The transfer-set indices a proxy of the provider's out-of-distribution detector passes.

    The attacker cannot see the provider's detector, but can guess what it learns: to tell the
    victim's domain from everything else. So it trains its own binary classifier, public
    in-domain images (``config.public``, never sent to the victim) against a sample of its
    transfer set, and keeps the ``config.keep`` share of the transfer set that classifier finds
    most in-domain.
    """
    public = load_dataset(config.public, victim.shape, seed=config.seed)
    rng = np.random.default_rng([config.seed, 5])
    side = min(len(public), len(transfer), PROXY_IMAGES)
    inside = np.sort(rng.choice(len(public), side, replace=False))
    outside = np.sort(rng.choice(len(transfer), side, replace=False))
    images = np.concatenate([public.get_batch(inside), transfer.get_batch(outside)])
    labels = np.repeat(np.array([1, 0], np.int64), side)
    torch.manual_seed(config.seed)
    proxy = build_model(config.arch, 2, victim.shape)
    fit(proxy, images, labels, TrainConfig(epochs=2, seed=config.seed, device=config.device),
        progress=False)  # fmt: skip
    in_domain = predict_proba(proxy, transfer)[:, 1]
    kept = max(1, round(len(transfer) * config.keep))
    return np.sort(np.argsort(-in_domain, kind="stable")[:kept])


def jacobian_step(
    model: Classifier, images: np.ndarray, labels: np.ndarray, step: float
) -> np.ndarray:
    """x + step * sign(d F_label(x) / d x), clipped and quantised back to uint8 pixels."""
    model.eval()
    device = next(model.parameters()).device
    x = to_tensor(images, device).requires_grad_(True)
    logits = model(x)
    chosen = logits.gather(1, torch.as_tensor(labels, device=device).view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(chosen, x)
    moved = (x.detach() + step * gradient.sign()).clamp_(0.0, 1.0)
    pixels = (moved * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.cpu().numpy()


def jbda_attack(
    client: ExtractionClient, config: JbdaConfig, victim: Victim, transfer: ImageSet
) -> AttackStream:
    """Papernot et al.: query a small seed set, then double it each round along the substitute's
    Jacobian (the step's sign flips every ``jbda_tau`` rounds, as in their periodic schedule)."""
    rng = np.random.default_rng(config.seed)
    seed_indices = np.sort(rng.choice(len(transfer), config.seed_size, replace=False))
    images = transfer.get_batch(seed_indices)
    answers = client.query(images)
    round_number = 0
    while True:
        substitute = yield Checkpoint(len(images), images, answers)
        left = config.budget - len(images)
        if left <= 0:
            return
        sign = -1.0 if (round_number // config.jbda_tau) % 2 else 1.0
        grown = _jacobian_batches(substitute, images, answers.labels, sign * config.jbda_lambda)
        grown = grown[:left]
        new_answers = client.query(grown)
        images = np.concatenate([images, grown])
        answers = _concat([answers, new_answers], victim.num_classes)
        round_number += 1


def _jacobian_batches(
    model: Classifier, images: np.ndarray, labels: np.ndarray, step: float, size: int = 512
) -> np.ndarray:
    return np.concatenate(
        [
            jacobian_step(model, images[i : i + size], labels[i : i + size], step)
            for i in range(0, len(images), size)
        ]
    )


def open_transfer(config: BaseAttackConfig, victim: Victim) -> ImageSet:
    return load_dataset(config.transfer, victim.shape, seed=config.seed, size=config.transfer_size)


def attack_stream(client: ExtractionClient, config: AttackConfig, victim: Victim) -> AttackStream:
    transfer = open_transfer(config, victim)
    if isinstance(config, JbdaConfig):
        return jbda_attack(client, config, victim, transfer)
    if isinstance(config, KnockoffConfig) and config.strategy != "random":
        if config.strategy == "adaptive":
            return adaptive_attack(client, config, victim, transfer)
        allowed = stealth_pool(config, victim, transfer) if config.strategy == "stealth" else None
        return active_attack(client, config, victim, transfer, allowed)
    cover = load_dataset(config.cover, victim.shape, seed=config.seed) if config.cover else None
    return sequence_attack(client, config, victim, transfer, cover)
