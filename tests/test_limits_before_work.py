"""Limits before work, and memory that a client cannot buy (issue 12, points 2 and 3).

A key's requests in flight, its rate limit and its quota are checked before its body is read;
the model's queue is bounded and served in turn across clients; idempotency keeps only what
the query log cannot answer yet.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import IMAGE_COUNT_HEADER, NPY_MEDIA_TYPE, PredictResponse, encode_npy
from server.errors import ApiError
from server.idempotency import IdempotencyCache
from server.inference import ForwardOutput, MicroBatcher, QueueFull
from server.ratelimit import InFlight
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN, REDIS_URL, bearer, wait_until, wait_until_async

BODY_BYTES = 32 * 2**20


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("fashion-mnist:test", InputShape(1, 28, 28)).get_batch(np.arange(64))


def post(client, key: str, batch: np.ndarray, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/predict",
        content=encode_npy(batch),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE, **headers},
    )


def announce(url: str, key: str, *, images: int = 256, timeout: float = 3.0) -> int | None:
    """Send a prediction request's headers announcing a 32 MB body and none of the body: the
    status the server answers with, or None when it waits for the body (it would read it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(
            (
                f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: {NPY_MEDIA_TYPE}\r\n"
                f"{IMAGE_COUNT_HEADER}: {images}\r\nContent-Length: {BODY_BYTES}\r\n\r\n"
            ).encode()
        )
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return None
    return int(reply.split(b"\r\n", 1)[0].split()[1])


@pytest.fixture(scope="module")
def server(tiny_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server whose keys may have one request in flight each."""
    work = tmp_path_factory.mktemp("limits")
    env = {
        "MLAAS_DATABASE_URL": f"sqlite:///{work / 'mlaas.db'}",
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_VAR_DIR": str(work),
        "MLAAS_MAX_IN_FLIGHT_PER_KEY": "1",
    }
    with ServerProcess(tiny_victim, env=env, log_file=work / "server.log") as running:
        yield running


@pytest.mark.slow
def test_a_key_over_its_limit_is_refused_before_its_body_is_read(server, images) -> None:
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        spent = admin.create_key("spent", daily_quota=1)
        throttled = admin.create_key("throttled", rate_limit=0.001, rate_burst=2)
        small = admin.create_key("small", daily_quota=100)
        fine = admin.create_key("fine")
    with httpx.Client(base_url=server.url) as http:
        assert post(http, spent, images[:1]).status_code == 200
        assert post(http, throttled, images[:2]).status_code == 200
    assert announce(server.url, spent, images=1) == 429  # quota used up: no body read
    assert announce(server.url, throttled, images=1) == 429  # its bucket is empty
    assert announce(server.url, small, images=200) == 413  # can never fit its quota
    assert announce(server.url, fine, images=257) == 413  # over the per-request image limit
    # The control: a key within its limits is charged and the server waits for the body.
    assert announce(server.url, fine, images=1) is None


@pytest.mark.slow
def test_a_key_has_at_most_its_share_of_requests_in_flight(server, images) -> None:
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        busy, other = admin.create_key("busy"), admin.create_key("other")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        # A request whose body never ends holds busy's one slot while the server reads it.
        # It expects 100-continue, so the server says when it starts reading the body: only
        # once the request holds its slot.
        slow.sendall(
            (
                f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {busy}\r\n"
                f"Content-Type: {NPY_MEDIA_TYPE}\r\nContent-Length: 1000000\r\n"
                "Expect: 100-continue\r\n\r\n"
            ).encode()
        )
        interim = b""
        while b"\r\n\r\n" not in interim:  # each recv waits at most the socket's timeout
            chunk = slow.recv(4096)
            assert chunk, f"the server hung up after {interim!r}"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        slow.sendall(b"\x93NUMPY")
        with httpx.Client(base_url=server.url) as http:
            refused = post(http, busy, images[:1])
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_requests_in_flight"
            assert refused.headers["retry-after"] == "1"
            assert post(http, other, images[:1]).status_code == 200
    # The slow request's connection is gone: its slot is free again.
    with httpx.Client(base_url=server.url) as http:

        def answered() -> bool:
            status = post(http, busy, images[:1]).status_code
            assert status in (200, 429), status  # refused only while the slot is still held
            return status == 200

        wait_until(answered, 10, what="busy's slot to be free")


@pytest.mark.parametrize("limiter", ["memory", "redis"])
def test_the_declared_count_is_charged_first_and_settled_after(
    make_client, images, database_url, limiter, request
) -> None:
    """On SQLite and PostgreSQL, with the in-process limiter and the shared one in Redis."""
    shared = {}
    if limiter == "redis":
        shared = {"redis_url": REDIS_URL, "redis_prefix": request.getfixturevalue("redis_prefix")}
    client = make_client(database_url=database_url, **shared)
    response = client.post(
        "/admin/keys", json={"name": "metered", "daily_quota": 10}, headers=bearer(ADMIN_TOKEN)
    )
    key = response.json()["key"]

    def remaining(response: httpx.Response) -> int:
        assert response.status_code == 200, response.text
        return int(response.headers["x-quota-remaining"])

    # Declared 4, sent 2: the two not sent are given back.
    assert remaining(post(client, key, images[:2], **{IMAGE_COUNT_HEADER: "4"})) == 8
    # Declared nothing (one charged first), sent 3: the other two are charged after decoding.
    assert remaining(post(client, key, images[:3])) == 5
    # Declared more than is left: refused before the body, and nothing is taken.
    refused = post(client, key, images[:6], **{IMAGE_COUNT_HEADER: "6"})
    assert refused.status_code == 429 and refused.headers["x-quota-remaining"] == "5"
    # A replay is not counted again: what it was charged is given back.
    first = post(client, key, images[:2], **{"Idempotency-Key": "k1", IMAGE_COUNT_HEADER: "2"})
    assert remaining(first) == 3
    again = post(client, key, images[:2], **{"Idempotency-Key": "k1", IMAGE_COUNT_HEADER: "2"})
    assert again.headers["idempotent-replayed"] == "true"
    assert remaining(post(client, key, images[:1])) == 2
    bad = post(client, key, images[:1], **{IMAGE_COUNT_HEADER: "zero"})
    assert bad.status_code == 422


def test_idempotency_holds_nothing_once_answers_are_logged(make_client, images) -> None:
    for mode in ("durable", "buffered"):
        client = make_client(log_mode=mode)
        key = client.post(
            "/admin/keys", json={"name": f"fresh-{mode}"}, headers=bearer(ADMIN_TOKEN)
        ).json()["key"]
        service = client.app.state.service
        for n in range(40):
            assert post(client, key, images[:2], **{"Idempotency-Key": f"k{n}"}).status_code == 200
        # the log answers retries from here on; the lambda is done with before the loop moves on
        wait_until(
            lambda: len(service.idempotency) == 0,  # noqa: B023
            10,
            what=f"no idempotency entries ({mode})",
        )
        replay = post(client, key, images[:2], **{"Idempotency-Key": "k7"})
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"


def test_idempotency_caps_each_clients_unfinished_requests() -> None:
    answer = PredictResponse(model="m", granularity="label", predictions=[])

    async def scenario() -> None:
        cache = IdempotencyCache(max_per_client=1)
        release = asyncio.Event()
        computing = 0  # requests that got as far as computing their answer

        async def slow():
            nonlocal computing
            computing += 1
            await release.wait()
            return answer, None

        async def nothing_logged():
            return None

        first = asyncio.create_task(cache.run("a", "k1", "f1", slow, nothing_logged))
        await wait_until_async(lambda: computing == 1, what="the first request computing")
        assert cache.holds("a", "k1")
        with pytest.raises(ApiError) as refused:
            await cache.run("a", "k2", "f2", slow, nothing_logged)
        assert refused.value.status == 429
        with pytest.raises(ApiError) as reused:
            await cache.run("a", "k1", "other body", slow, nothing_logged)
        assert reused.value.status == 422
        duplicate = asyncio.create_task(cache.run("a", "k1", "f1", slow, nothing_logged))
        other = asyncio.create_task(cache.run("b", "k1", "f1", slow, nothing_logged))
        # Tasks start in the order they were made: once b's request computes, the duplicate
        # has started too, and nothing comes before its wait for the first's answer.
        await wait_until_async(lambda: computing == 2, what="b's request computing")
        release.set()
        assert await first == (answer, False)
        assert await duplicate == (answer, True)  # waited for the first, computed nothing
        assert await other == (answer, False)
        assert len(cache) == 0

    asyncio.run(scenario())


def test_in_flight_counts_each_key_up_to_its_limit() -> None:
    slots = InFlight(2)
    assert slots.enter("a") and slots.enter("a") and not slots.enter("a")
    assert slots.enter("b")
    slots.leave("a")
    assert slots.enter("a")
    for _ in range(3):
        slots.leave("a")
    slots.leave("b")
    assert len(slots) == 0  # no key is remembered once it has nothing in flight


class _GatedVictim:
    """A stand-in victim whose forward passes wait for a gate and record what they saw: the
    batcher's scheduling is what is under test, not the model."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.passing = threading.Event()
        """Set once a forward pass has begun: it holds the model until the gate opens."""
        self.batches: list[list[int]] = []

    def forward(self, images: np.ndarray) -> ForwardOutput:
        self.passing.set()
        self.gate.wait(10)
        self.batches.append([int(image[0, 0, 0]) for image in images])
        n = len(images)
        return ForwardOutput(np.zeros((n, 2), np.float32), np.zeros((n, 2)), np.zeros((n, 1)))


def _job(tag: int, size: int = 1) -> np.ndarray:
    return np.full((size, 2, 2, 1), tag, np.uint8)


def test_the_model_queue_serves_clients_in_turn_and_is_bounded() -> None:
    async def scenario() -> None:
        victim = _GatedVictim()
        batcher = MicroBatcher(victim, max_batch=2, max_wait_s=0.0, max_queued=8)  # type: ignore[arg-type]
        batcher.start()
        # The first pass holds the model; then a heavy client queues four requests and a light
        # one a single request after them.
        running = asyncio.create_task(batcher.submit(_job(9, 2), "heavy"))
        await wait_until_async(victim.passing.is_set, what="the first pass to hold the model")
        heavy = [asyncio.create_task(batcher.submit(_job(1, 2), "heavy")) for _ in range(2)]
        await wait_until_async(lambda: batcher.queued_images == 4, what="heavy's 4 queued")
        with pytest.raises(QueueFull, match="share"):  # 4 of 8 queued: heavy's half is used
            await batcher.submit(_job(1), "heavy")
        light = asyncio.create_task(batcher.submit(_job(2, 2), "light"))
        other = asyncio.create_task(batcher.submit(_job(3, 2), "other"))
        await wait_until_async(lambda: batcher.queued_images == 8, what="8 images queued")
        with pytest.raises(QueueFull, match="full"):  # 8 of 8 queued
            await batcher.submit(_job(4), "late")
        victim.gate.set()
        await asyncio.gather(running, *heavy, light, other)
        await batcher.stop()
        # One request per client per turn: light and other are served before heavy's second.
        assert victim.batches == [[9, 9], [1, 1], [2, 2], [3, 3], [1, 1]]
        assert batcher.queued_images == 0

    asyncio.run(scenario())
