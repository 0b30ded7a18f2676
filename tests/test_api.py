"""The prediction API in-process: formats, granularity, auth, errors and the query log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy, encode_png
from server.db import QueryRecord, make_engine
from server.inference import MicroBatcher, Victim
from tests.helpers import ADMIN_TOKEN, bearer, create_key, wait_until


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset("fashion-mnist:test", InputShape(1, 28, 28))
    indices = np.arange(12)
    return test.get_batch(indices), test.labels[indices]


def png_file(image: np.ndarray, name: str = "item.png") -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (name, encode_png(image), "image/png"))


def post_npy(client, key: str, images: np.ndarray):
    return client.post(
        "/v1/predict",
        content=encode_npy(images),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
    )


def vector(prediction: dict, classes: int = 10) -> np.ndarray:
    out = np.zeros(classes)
    for score in prediction["scores"]:
        out[score["index"]] = score["prob"]
    return out


def test_three_formats_give_the_in_process_answer(make_client, tiny_victim, test_images) -> None:
    images, _ = test_images
    client = make_client()
    key = create_key(client, "alice")
    expected = Victim(tiny_victim, "cpu").forward(images).probs

    by_npy = post_npy(client, key, images)
    by_files = client.post("/v1/predict", files=[png_file(i) for i in images], headers=bearer(key))
    encoded = [base64.b64encode(encode_png(i)).decode() for i in images]
    by_json = client.post("/v1/predict", json={"images": encoded}, headers=bearer(key))

    for response in (by_npy, by_files, by_json):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny-fashion" and body["granularity"] == "probs"
        got = np.stack([vector(p) for p in body["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert [p["label"] for p in body["predictions"]] == list(expected.argmax(1))
    ids = [p["query_id"] for r in (by_npy, by_files, by_json) for p in r.json()["predictions"]]
    assert len(set(ids)) == 3 * len(images)


def test_any_size_colour_jpeg_is_converted(make_client) -> None:
    client = make_client()
    key = create_key(client, "bob")
    photo = Image.new("RGB", (300, 200), (200, 30, 30))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    response = client.post(
        "/v1/predict",
        files=[("file", ("photo.jpg", buffer.getvalue(), "image/jpeg"))],
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1


@pytest.mark.parametrize(
    ("deployment", "key_override", "expected", "count"),
    [
        ("probs", None, "probs", 10),
        ("topk:3", None, "topk:3", 3),
        ("label", None, "label", None),
        ("round:2", None, "round:2", 10),
        ("probs", "topk:2,round:1", "topk:2,round:1", 2),
        ("topk:3", "label", "label", None),
    ],
)
def test_granularity_per_deployment_and_per_key(
    make_client, test_images, deployment, key_override, expected, count
) -> None:
    images, _ = test_images
    client = make_client(granularity=deployment)
    key = create_key(client, "carol", key_override)
    assert client.get("/v1/model").json()["granularity"] == deployment
    body = post_npy(client, key, images[:3]).json()
    assert body["granularity"] == expected
    for prediction in body["predictions"]:
        if count is None:
            assert prediction["scores"] is None
            continue
        probs = [s["prob"] for s in prediction["scores"]]
        assert len(probs) == count and probs == sorted(probs, reverse=True)
        assert prediction["scores"][0]["index"] == prediction["label"]
        if "round" in expected:
            decimals = int(expected.split("round:")[1])
            assert all(round(p, decimals) == p for p in probs)


def test_model_card_is_public_and_discloses_no_internals(make_client) -> None:
    client = make_client()
    card = client.get("/v1/model").json()
    assert card["input_shape"] == "1x28x28" and len(card["classes"]) == 10
    assert card["classes"][0] == "T-shirt/top"
    assert "architecture" not in card and "test_accuracy" not in card
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
        NPY_MEDIA_TYPE,
    }


def test_authentication(make_client, test_images) -> None:
    images, _ = test_images
    client = make_client()
    key = create_key(client, "dave")
    assert post_npy(client, key, images[:1]).status_code == 200
    no_key = client.post("/v1/predict", content=encode_npy(images[:1]))
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized"
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert post_npy(client, "mlk_not-a-key", images[:1]).status_code == 401
    client.app.state.service.keys.revoke("dave")
    revoked = post_npy(client, key, images[:1])
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]


def test_admin_routes_need_the_admin_token(make_client) -> None:
    client = make_client()
    assert client.get("/admin/queries").status_code == 401
    assert client.get("/admin/queries", headers=bearer("wrong")).status_code == 401
    assert client.get("/admin/queries", headers=bearer(ADMIN_TOKEN)).status_code == 200
    user_key = create_key(client, "erin")
    assert client.get("/admin/stats", headers=bearer(user_key)).status_code == 401
    duplicate = client.post("/admin/keys", json={"name": "erin"}, headers=bearer(ADMIN_TOKEN))
    assert duplicate.status_code == 409


def test_admin_disabled_without_a_token(make_client) -> None:
    client = make_client(admin_token=None)
    response = client.get("/admin/queries", headers=bearer("anything"))
    assert response.status_code == 403
    assert "MLAAS_ADMIN_TOKEN" in response.json()["error"]["message"]
    # Before any body is read: a malformed one is no 422 here.
    assert client.post("/admin/keys", content=b"{", headers=bearer("x")).status_code == 403


def test_bad_input_gets_clear_errors_and_the_service_goes_on(make_client, test_images) -> None:
    images, _ = test_images
    client = make_client(
        max_images_per_request=4, max_body_bytes=64 * 1024, max_image_pixels=10_000
    )
    key = create_key(client, "frank")
    cases = [
        (
            client.post(
                "/v1/predict", content=b"x", headers={**bearer(key), "Content-Type": "text/plain"}
            ),
            415,
        ),
        (
            client.post(
                "/v1/predict",
                files=[("file", ("bad.png", b"junk", "image/png"))],
                headers=bearer(key),
            ),
            422,
        ),
        (post_npy(client, key, images[:5]), 413),
        (post_npy(client, key, np.zeros((1, 200, 200), np.uint8)), 413),
        (client.post("/v1/predict", files=[png_file(images[0])] * 5, headers=bearer(key)), 413),
        (
            client.post(
                "/v1/predict",
                content=b"\0" * 70_000,
                headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
            ),
            413,
        ),
        (client.post("/v1/predict", json={"images": []}, headers=bearer(key)), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] and error["message"]
        assert "Traceback" not in response.text
    assert "bad.png" in cases[1][0].json()["error"]["message"]
    assert post_npy(client, key, images[:2]).status_code == 200
    stats = client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).json()
    assert stats["rejected_by_status"]["413"] == 4
    assert stats["rejected_by_status"]["422"] == 2


def logged_rows(engine) -> list[QueryRecord]:
    with Session(engine) as session:
        return list(session.scalars(select(QueryRecord).order_by(QueryRecord.created_at)))


def test_query_log_rows(make_client, test_images, database_url: str) -> None:
    images, _ = test_images
    client = make_client(database_url=database_url)
    alice, bob = create_key(client, "alice"), create_key(client, "bob", "label")
    answered = post_npy(client, alice, images[:5]).json()["predictions"]
    answered += post_npy(client, bob, images[5:8]).json()["predictions"]
    post_npy(client, "mlk_wrong", images[:3])  # refused: counted, not logged
    client.post(
        "/v1/predict", files=[("file", ("x.png", b"junk", "image/png"))], headers=bearer(alice)
    )
    client.__exit__(None, None, None)  # graceful stop: flushes the writer

    rows = logged_rows(make_engine(database_url))  # no waiting: the stop flushed them
    assert len(rows) == 8
    by_id = {row.id: row for row in rows}
    assert set(by_id) == {p["query_id"] for p in answered}
    for prediction, image in zip(answered, images[:8], strict=True):
        row = by_id[prediction["query_id"]]
        assert row.predicted == prediction["label"]
        assert row.payload["label_name"] == prediction["label_name"]
        assert row.input_shape == "28x28x1"
        assert row.created_at.tzinfo is not None
        assert row.latency_ms > 0
        decoded = np.asarray(Image.open(io.BytesIO(row.input_png)))
        assert np.array_equal(decoded, image[..., 0])
        assert row.input_sha256 == hashlib.sha256(image.tobytes()).hexdigest()
    assert {r.client for r in rows} == {"alice", "bob"}
    assert {r.granularity for r in rows if r.client == "bob"} == {"label"}
    assert all(r.payload["scores"] is None for r in rows if r.client == "bob")


def clock_past(instant: float) -> float:
    """The wall clock once it reads at least a microsecond (the query log's resolution) past
    ``instant``: at once, unless the clock is coarser than the time a request takes."""
    return wait_until(
        lambda: (now := time.time()) >= instant + 1e-6 and now,
        1,
        interval=0.001,
        what=f"the clock to pass {instant}",
    )


def test_admin_queries_filter_by_client_and_time(make_client, test_images) -> None:
    images, _ = test_images
    client = make_client(log_inputs=False)
    alice, bob = create_key(client, "alice"), create_key(client, "bob")
    post_npy(client, alice, images[:4])
    # The server stamps rows with the wall clock before it answers: `middle` falls after
    # every row of alice's and, as the clock moves on before bob is sent, before his.
    middle = clock_past(time.time())
    clock_past(middle)
    post_npy(client, bob, images[:2])
    admin = bearer(ADMIN_TOKEN)
    service = client.app.state.service
    wait_until(lambda: service.writer.written >= 6, 10, what="6 rows written")
    everyone = client.get("/admin/queries", headers=admin).json()
    assert len(everyone) == 6
    only_bob = client.get("/admin/queries", params={"client": "bob"}, headers=admin).json()
    assert [r["client"] for r in only_bob] == ["bob", "bob"]
    since = datetime.fromtimestamp(middle, UTC).isoformat()
    recent = client.get("/admin/queries", params={"since": since}, headers=admin).json()
    assert {r["client"] for r in recent} == {"bob"}
    with_input = client.get("/admin/queries", params={"include_input": True}, headers=admin).json()
    assert all(r["input_png_base64"] is None for r in with_input)  # log_inputs=False


def test_concurrent_requests_share_forward_passes(tiny_victim: Path, test_images) -> None:
    images, _ = test_images
    victim = Victim(tiny_victim, "cpu")
    expected = victim.forward(images).probs

    async def run() -> tuple[list, int]:
        batcher = MicroBatcher(victim, max_batch=64, max_wait_s=0.05)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(images[i : i + 1]) for i in range(12)))
        finally:
            await batcher.stop()
        return results, batcher.batches

    results, batches = asyncio.run(run())
    assert batches < 12  # several requests per forward pass
    got = np.concatenate([r.probs for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(len(r) == 1 and r.features.shape[0] == 1 for r in results)


def test_idempotent_retries_are_answered_once(make_client, test_images) -> None:
    images, _ = test_images
    client = make_client()
    key = create_key(client, "retrier")

    def send(batch: np.ndarray, idempotency_key: str):
        return client.post(
            "/v1/predict",
            content=encode_npy(batch),
            headers={
                **bearer(key),
                "Content-Type": NPY_MEDIA_TYPE,
                "Idempotency-Key": idempotency_key,
            },
        )

    first, again = send(images[:4], "batch-1"), send(images[:4], "batch-1")
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert first.json() == again.json()  # the same query ids: the same answered queries
    reused = send(images[4:8], "batch-1")
    assert reused.status_code == 422 and "different" in reused.json()["error"]["message"]
    assert send(images[4:8], "batch-2").status_code == 200
    service = client.app.state.service
    # Rows are queued for the writer before their request is answered and count as pending
    # until it is done with them: with none pending, a replay logged twice would be counted.
    wait_until(lambda: service.writer.pending == 0, 10, what="every queued row written")
    assert service.writer.written == 8  # 4 + 4 answered; the replay added nothing


def test_prometheus_metrics(make_client, test_images) -> None:
    images, _ = test_images
    client = make_client()
    key = create_key(client, "metered")
    post_npy(client, key, images[:5])
    post_npy(client, "mlk_wrong", images[:1])
    assert client.get("/metrics").status_code == 401  # the labels name clients
    text = client.get("/metrics", headers=bearer(ADMIN_TOKEN)).text
    assert 'mlaas_answered_queries_total{client="metered"} 5.0' in text
    assert 'mlaas_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'mlaas_requests_total{method="POST",route="/v1/predict",status="401"} 1.0' in text
    assert "mlaas_forward_batch_images_count 1.0" in text
    assert 'mlaas_request_seconds_bucket{le="+Inf",method="POST",route="/v1/predict"}' in text
