"""What bounding PRADA's per-client state costs: bytes, time per query, and detection.

    .venv/bin/python bench/prada_bound.py [--queries 200000] [--batch 64] [--delta 0.95]
                                          [--victim var/victims/fashion] [--quick]

Offline, no server: the detector alone, fed as the monitor feeds it (batches of ``--batch``
queries of one client), BLAS single-threaded as in the server.

1. Size and cost. One long benign-looking client: the Fashion-MNIST public pool, again and
   again, each pass with mild natural variations (shifts, brightness, noise), so that no query
   repeats exactly. Labels: the victim's on the unvaried image (random when there is no victim).
   The bounded PRADA (the defaults: 4 MiB of growing sets, 5,000 distances) over all of it;
   the unbounded one (no caps, the reference's behaviour) as far as it stays affordable.
   Printed at checkpoints: the state's bytes (arrays, and the .npz Redis stores), and the
   microseconds per query over the stretch since the last checkpoint.
2. Detection. Queries until the first alarm ("-": none) and the last W, with the bound at
   several budgets and without it, on three clients of ``--stream`` queries each:
   * knockoff: natural crops, labelled by the victim;
   * jbda: 150 test images, then rounds of every one moved by +-25 (0.1 of the range) on
     every pixel (random signs standing in for the substitute's Jacobian), each query
     labelled by the victim;
   * benign: the public pool with mild variations.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from defense.detectors import Observation, Prada
from defense.state import encode_state
from mlaas.datasets import load_dataset
from mlaas.images import InputShape, mild_variations, to_tensor

SHAPE = InputShape(1, 28, 28)
CLASSES = 10
UNBOUNDED = {"growing_set_bytes": 2**62, "distance_window": 2**62}


def labeller(victim: Path | None, seed: int):
    """The victim's labels for uint8 images, or random labels without a victim."""
    if victim is None or not (victim / "model.pt").exists():
        rng = np.random.default_rng(seed)
        print(f"no victim at {victim}: random labels")
        return lambda images: rng.integers(0, CLASSES, len(images))
    from mlaas.modelstore import load_model

    model, _ = load_model(victim)

    def label(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), 1024):
                out.append(model(to_tensor(images[start : start + 1024])).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=int)

    return label


def observation(images: np.ndarray, labels: np.ndarray) -> Observation:
    probs = np.full((len(labels), CLASSES), 0.01, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 0.91
    return Observation(images, np.log(probs), probs, np.zeros((len(labels), 1), np.float32))


class Pool:
    """The public pool, pass after pass, each pass mildly varied."""

    def __init__(self, label, seed: int) -> None:
        self.images = load_dataset("fashion-mnist:pool", SHAPE).get_batch(np.arange(10_000))
        self.labels = label(self.images)
        self.rng = np.random.default_rng(seed)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        chunks, labels = [], []
        while sum(len(c) for c in chunks) < count:
            order = self.rng.permutation(len(self.images))
            chunks.append(mild_variations(self.images[order], self.rng))
            labels.append(self.labels[order])
        return np.concatenate(chunks)[:count], np.concatenate(labels)[:count]


def size_and_cost(args: argparse.Namespace, pool: Pool) -> None:
    checkpoints = [
        c for c in (1_000, 10_000, 50_000, 100_000, 200_000, 500_000, 1_000_000) if c < args.queries
    ] + [args.queries]
    images, labels = pool.take(args.queries)
    print(
        f"\n1. Size and cost: one benign-looking client, {args.queries:,} queries in batches "
        f"of {args.batch}"
    )
    header = f"{'':10} {'queries':>9} {'state bytes':>12} {'npz bytes':>12} {'us/query':>9}"
    print(header + f" {'set rows':>9} {'W':>7} {'alarm':>7}")
    for name, options, limit in (
        ("bounded", {}, args.queries),
        ("unbounded", UNBOUNDED, min(args.queries, args.unbounded_queries)),
    ):
        if limit <= 0:
            continue
        prada = Prada(delta=args.delta, **options)
        state = prada.initial_state()
        done, spent, alarm = 0, 0.0, None
        for checkpoint in sorted({c for c in checkpoints if c <= limit} | {limit}):
            started = time.perf_counter()
            for start in range(done, checkpoint, args.batch):
                stop = min(start + args.batch, checkpoint)
                result = prada.observe(state, observation(images[start:stop], labels[start:stop]))
                if result.alarm_at is not None:
                    alarm = start + result.alarm_at + 1
            spent = time.perf_counter() - started
            per_query = spent / (checkpoint - done) * 1e6
            done = checkpoint
            rows = sum(len(v) for k, v in state.items() if k.startswith("rows_"))
            print(
                f"{name:10} {checkpoint:>9,} {Prada.state_bytes(state):>12,} "
                f"{len(encode_state(state)):>12,} {per_query:>9.0f} {rows:>9,} "
                f"{float(state['statistic']):>7.3f} {'-' if alarm is None else alarm:>7}"
            )
        if limit < args.queries:
            print(f"{name:10} (stopped at {limit:,}: it grows without bound)")


def jbda_like(test: np.ndarray, label, count: int, rng: np.random.Generator):
    current = test[rng.choice(len(test), 150, replace=False)].astype(np.int16)
    rounds = [current]
    while len(rounds) * len(current) < count:
        current = np.clip(current + 25 * rng.choice([-1, 1], current.shape), 0, 255)
        rounds.append(current)
    images = np.concatenate(rounds)[:count].astype(np.uint8)
    return images, label(images)


def first_alarm(prada: Prada, images: np.ndarray, labels: np.ndarray, batch: int):
    state = prada.initial_state()
    alarm = None
    for start in range(0, len(labels), batch):
        stop = min(start + batch, len(labels))
        result = prada.observe(state, observation(images[start:stop], labels[start:stop]))
        if result.alarm_at is not None:
            alarm = start + result.alarm_at + 1  # queries sent, the alarming one included
    return alarm, float(state["statistic"])


def detection(args: argparse.Namespace, pool: Pool, label) -> None:
    rng = np.random.default_rng(args.seed + 1)
    crops = load_dataset("natural-crops", SHAPE)
    knockoff = crops.get_batch(rng.permutation(len(crops))[: args.stream])
    test = load_dataset("fashion-mnist:test", SHAPE).get_batch(np.arange(10_000))
    streams = {
        "knockoff": (knockoff, label(knockoff)),
        "jbda": jbda_like(test, label, args.stream, rng),
        "benign": pool.take(args.stream),
    }
    budgets = [
        ("unbounded", UNBOUNDED),
        ("4 MiB", {}),
        ("512 KiB", {"growing_set_bytes": 2**19}),
        ("64 KiB", {"growing_set_bytes": 2**16}),
        ("8 KiB", {"growing_set_bytes": 2**13}),
    ]
    print(
        f"\n2. Detection: queries to the first alarm (-: none) and the last W, delta "
        f"{args.delta}, {args.stream:,} queries per client"
    )
    row_bytes = SHAPE.channels * SHAPE.height * SHAPE.width
    rows = {name: Prada(**options).rows_per_class(row_bytes, CLASSES) for name, options in budgets}
    print(f"{'growing sets':14}" + "".join(f"{name:>16}" for name, _ in budgets))
    print(
        f"{'rows per class':14}"
        + "".join(f"{'all' if name == 'unbounded' else rows[name]:>16}" for name, _ in budgets)
    )
    for stream, (images, labels) in streams.items():
        cells = []
        for _, options in budgets:
            alarm, w = first_alarm(Prada(delta=args.delta, **options), images, labels, args.batch)
            cells.append(f"{'-' if alarm is None else f'{alarm:,}'} (W {w:.3f})")
        print(f"{stream:14}" + "".join(f"{cell:>16}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200_000, help="the long client's length")
    parser.add_argument(
        "--unbounded-queries",
        type=int,
        default=30_000,
        help="how far to follow the unbounded PRADA",
    )
    parser.add_argument("--stream", type=int, default=5_000, help="queries per detection client")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--delta", type=float, default=0.95)
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20,000 and 3,000 queries")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.unbounded_queries, args.stream = 20_000, 10_000, 3_000
    threadpool_limits(1, user_api="blas")
    torch.set_num_threads(1)
    label = labeller(args.victim, args.seed)
    pool = Pool(label, args.seed)
    size_and_cost(args, pool)
    detection(args, pool, label)


if __name__ == "__main__":
    main()
