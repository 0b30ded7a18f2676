"""Property-based fuzzing of the whole HTTP API with schemathesis, from the app's /openapi.json.

Every operation in the app's own OpenAPI document is fuzzed with schema-valid (positive) and,
where it takes any input, schema-violating (negative) requests: about 2,000 in all. No
response may be a 5xx, and each must have a documented status, content type and headers and
match its documented body schema; POST /admin/keys is held to every check schemathesis has,
as `--checks all` runs them (schema-valid bodies accepted, invalid ones refused, auth
enforced). Most requests carry a valid credential (an API key for the public routes, the
admin token for /admin/* and /metrics) so that they get past authentication to the
handlers; the rest carry none, a made-up one or the other role's, and a secured route must
refuse those. A third of the positive /v1/predict requests carry real
images of random sizes, channels and formats instead of random bytes, so that decoding, the
model, output shaping and the query log are fuzzed too.

The app runs in-process, built as ``make_client`` builds it, and schemathesis calls it through
its ASGI transport rather than a uvicorn child on loopback: nothing to start or wait for, no
ports, a few milliseconds a case, and a server-side traceback lands in this test's output.
Schemathesis starts the app's lifespan on its own event loop with the first request (loading
/openapi.json) and keeps it running for the requests after, so the model, the micro-batcher
and the query-log writer start once; ``asgi.shutdown_lifespans()`` runs the app's shutdown at
the end. A starlette TestClient cannot hold the lifespan instead: schemathesis would start a
second one, and its requests would run on another event loop than the batcher's.
Schemathesis's pytest integration (``schema.parametrize()``) fails under pytest 9.2 (it sets
``Item._nodeid``), so each operation's Hypothesis strategy is driven here directly.

Reproducible: Hypothesis derandomized (a fixed seed), no example database, a fixed number of
cases per operation and generation mode. On two CPU cores the fuzzing takes about 15 s and
the file about 35 s, the tiny victim's training included.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import load_all_checks, not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.app import create_app
from server.settings import ServerSettings
from tests.helpers import ADMIN_TOKEN, bearer, create_key

# The .npy body is bytes on the wire, as application/octet-stream is.
schemathesis.serializer.alias(NPY_MEDIA_TYPE, "application/octet-stream")

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
load_all_checks()
# Every operation is held to every check schemathesis has, as `--checks all` runs them
# (positive data accepted, negative data refused, auth enforced, ...), but POST /v1/predict:
# no schema can say "a decodable image", so the schema-valid bytes it generates are refused
# (422, naming the item) as they must be. Those checks found a denormal rate_limit, control
# characters in granularity and `true` for a number accepted by POST /admin/keys, and a Unix
# time for `since` by GET /admin/alerts.
PARTIAL_CHECKS_FOR = {"POST /v1/predict"}
MIN_CASES = 1000
# Cases per operation and generation mode; Hypothesis stops sooner where it runs out of
# distinct inputs (an operation without parameters has few).
BUDGET = {"POST /v1/predict": (400, 200)}
DEFAULT_BUDGET = (100, 80)
REQUEST_TIMEOUT_S = 10.0  # a hang fails the request instead of stalling the run

# The credential a case carries: mostly a valid one, so that the cases reach the handlers.
AUTH = st.sampled_from(["valid"] * 6 + ["none", "crossed", "made-up"]).flatmap(
    lambda auth: (
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
        if auth == "made-up"
        else st.just(auth)
    )
)
# Credentials are this test's to choose, not the generator's.
CONFIG = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


@dataclass
class Fuzzed:
    schema: Any
    key: str
    exercised: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fuzzed(tiny_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        ServerSettings(
            victim_dir=tiny_victim,
            database_url=f"sqlite:///{tmp / 'fuzz.db'}",
            admin_token=ADMIN_TOKEN,
            var_dir=tmp / "var",
            # A third of the cases carry a wrong credential on purpose: no lock-out here.
            admin_failures_per_minute=1_000_000,
        )
    )
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
        with asgi.get_client(app) as client:  # the same running app as the schema's
            yield Fuzzed(schema, create_key(client, "fuzzer"))
    finally:
        asgi.shutdown_lifespans()


def _encode(image: np.ndarray, fmt: str) -> bytes:
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if fmt == "JPEG" and picture.mode == "RGBA":
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def image_bodies(draw: st.DrawFn) -> tuple[str, Any]:
    """A real image batch as one of the three body formats /v1/predict takes."""
    count = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    channels = draw(st.sampled_from([1, 3, 4]))
    seed = draw(st.integers(0, 2**32 - 1))
    images = np.random.default_rng(seed).integers(
        0, 256, (count, height, width, channels), dtype=np.uint8
    )
    media = draw(st.sampled_from([NPY_MEDIA_TYPE, "multipart/form-data", "application/json"]))
    if media == NPY_MEDIA_TYPE:
        return media, encode_npy(images[..., 0] if channels == 1 else images)
    files = [_encode(image, draw(st.sampled_from(FORMATS))) for image in images]
    if media == "multipart/form-data":
        return media, {"file": files}
    return media, {"images": [base64.b64encode(data).decode() for data in files]}


def _takes_input(operation: Any) -> bool:
    return bool(list(operation.iter_parameters()) or operation.body)


def _fuzz(operation: Any, mode: GenerationMode, max_examples: int, fuzzed: Fuzzed) -> None:
    admin = operation.path.startswith("/admin/") or operation.path == "/metrics"
    own, other = (ADMIN_TOKEN, fuzzed.key) if admin else (fuzzed.key, ADMIN_TOKEN)
    secured = bool(operation.definition.raw.get("security"))
    real_images = operation.label == "POST /v1/predict" and mode is GenerationMode.POSITIVE
    bodies = st.one_of(st.none(), st.none(), image_bodies()) if real_images else st.none()
    # Half the positive cases name a client that exists, so that the handler does some work.
    known_names = st.booleans() if mode is GenerationMode.POSITIVE else st.just(False)

    @hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        # Schema-driven strategies are large and the app is slow next to pure functions.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        print_blob=False,
    )
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=mode),
        auth=AUTH,
        body=bodies,
        known_name=known_names,
    )
    def fuzz(case: Any, auth: str, body: tuple[str, Any] | None, known_name: bool) -> None:
        if body is not None:
            case.media_type, case.body = body
        if known_name and "name" in case.path_parameters:
            case.path_parameters = {**case.path_parameters, "name": "fuzzer"}
        token = {"valid": own, "crossed": other, "none": None}.get(auth, auth)
        # Sent as the CLI's -H sends it: schemathesis then knows the credential is meant (its
        # ignored_auth check probes without it and with a wrong one, expecting refusals).
        credential = {"Authorization": f"Bearer {token}"} if token is not None else None
        fuzzed.exercised[(case.method.upper(), case.path, mode.value)] += 1
        checks = CHECKS if operation.label in PARTIAL_CHECKS_FOR else REGISTERED_CHECKS.get_all()
        response = case.call_and_validate(
            headers=credential, checks=checks, timeout=REQUEST_TIMEOUT_S
        )
        fuzzed.statuses[(operation.label, response.status_code)] += 1
        if secured and auth != "valid":
            # Refused: 401, or the malformed body or request FastAPI refuses before auth.
            assert response.status_code in (400, 401, 413, 422), f"{auth!r}: {response.text}"

    fuzz()


@pytest.mark.slow
def test_fuzz_every_operation(fuzzed: Fuzzed) -> None:
    started = time.monotonic()
    operations = [result.ok() for result in fuzzed.schema.get_all_operations()]
    failures = []
    for operation in operations:
        positive, negative = BUDGET.get(operation.label, DEFAULT_BUDGET)
        runs = [(GenerationMode.POSITIVE, positive)]
        if _takes_input(operation):
            runs.append((GenerationMode.NEGATIVE, negative))
        for mode, max_examples in runs:
            try:
                _fuzz(operation, mode, max_examples, fuzzed)
            except hypothesis.errors.Unsatisfiable:
                # No request violates the schema here: a path parameter that takes any
                # string does not leave one. The positive cases cover the operation.
                if mode is not GenerationMode.NEGATIVE:
                    raise
                print(f"{operation.label}: no schema-violating request exists")
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a group
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    elapsed = time.monotonic() - started
    per_operation: Counter[tuple[str, str]] = Counter()
    for (method, path, _), count in fuzzed.exercised.items():
        per_operation[(method, path)] += count
    total = sum(per_operation.values())
    print(f"\n{total} cases in {elapsed:.1f} s:")
    for (method, path), count in sorted(per_operation.items(), key=lambda item: item[0][::-1]):
        label = f"{method} {path}"
        seen = {status: n for (op, status), n in sorted(fuzzed.statuses.items()) if op == label}
        print(f"  {label:28} {count:5} cases, statuses {seen}")
    assert not failures, "\n\n".join(failures)
    assert total >= MIN_CASES
    documented = {
        (method.upper(), path)
        for path, item in fuzzed.schema.raw_schema["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace")
    }
    assert {(operation.method.upper(), operation.path) for operation in operations} == documented
    assert set(per_operation) == documented


def test_npz_body_is_refused_not_a_crash(fuzzed: Fuzzed) -> None:
    """Found by the fuzzer: a zip (.npz) body sent as application/x-npy was a 500."""
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((1, 28, 28), dtype=np.uint8))
    with asgi.get_client(fuzzed.schema.app) as client:
        response = client.post(
            "/v1/predict",
            data=buffer.getvalue(),
            headers={**bearer(fuzzed.key), "Content-Type": NPY_MEDIA_TYPE},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_image"


def test_numbers_too_large_for_sql_are_refused_not_a_crash(fuzzed: Fuzzed) -> None:
    """Found by the fuzzer: an offset or a key limit past a SQL integer was a 500."""
    admin = bearer(ADMIN_TOKEN)
    with asgi.get_client(fuzzed.schema.app) as client:
        assert client.get("/admin/queries?offset=9223372036854775807", headers=admin).json() == []
        too_far = client.get("/admin/queries?offset=9223372036854775808", headers=admin)
        assert too_far.status_code == 422, too_far.text
        for field in ("rate_burst", "daily_quota"):
            for value, status in ((2**31, 422), (2**63, 422), (2**31 - 1, 201)):
                body = {"name": f"{field}-{value}", field: value}
                response = client.post("/admin/keys", json=body, headers=admin)
                assert response.status_code == status, response.text


def test_client_name_with_a_trailing_newline_is_refused(fuzzed: Fuzzed) -> None:
    """The documented name pattern ends in "$", which re.match let pass a trailing newline."""
    with asgi.get_client(fuzzed.schema.app) as client:
        response = client.post(
            "/admin/keys", json={"name": "mallory\n"}, headers=bearer(ADMIN_TOKEN)
        )
    assert response.status_code == 422, response.text


def test_key_limits_and_granularity_are_refused_as_the_schema_says(fuzzed: Fuzzed) -> None:
    """Found by `--checks all`: a denormal rate_limit (its interval per image overflowed) and
    control characters in granularity ("probs\\x0b" read as "probs") were accepted."""
    schema = fuzzed.schema.raw_schema["paths"]["/admin/keys"]["post"]["requestBody"]
    fields = schema["content"]["application/json"]["schema"]["properties"]
    assert {"type": "number", "minimum": 1e-06} in fields["rate_limit"]["anyOf"]
    granularity = next(s for s in fields["granularity"]["anyOf"] if s.get("type") == "string")
    admin = bearer(ADMIN_TOKEN)
    cases = [
        ({"rate_limit": 5e-324}, 422),
        ({"rate_limit": 1e-7}, 422),
        ({"rate_limit": 1e-6}, 201),
        ({"rate_limit": True}, 422),  # JSON's true is no number (pydantic's lax mode took 1.0)
        ({"rate_burst": True}, 422),
        ({"daily_quota": 2.0}, 201),  # an integer to JSON Schema
        ({"granularity": "probs\x0b"}, 422),
        ({"granularity": "label\n"}, 422),
        ({"granularity": "topk:3,round:2"}, 201),
    ]
    with asgi.get_client(fuzzed.schema.app) as client:
        for i, (fields_sent, status) in enumerate(cases):
            body = {"name": f"strict-{i}", **fields_sent}
            response = client.post("/admin/keys", json=body, headers=admin)
            assert response.status_code == status, (body, response.text)
            if "granularity" in fields_sent:
                # fullmatch: "$" ends the text in JSON Schema's (ECMA) regexes, not a line
                documented = re.fullmatch(granularity["pattern"], fields_sent["granularity"])
                assert bool(documented) == (status == 201)  # the schema says the same
        # `since` is an ISO 8601 time, as documented: a bare number is refused, not read as
        # seconds since 1970.
        for route in ("/admin/alerts", "/admin/queries"):
            for since, status in (("29447131", 422), ("1e5", 422), ("2026-12-01T17:00:00Z", 200)):
                response = client.get(route, params={"since": since}, headers=admin)
                assert response.status_code == status, (route, since, response.text)
