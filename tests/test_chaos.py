"""The chaos benchmark (bench/chaos.py) in miniature, so that CI keeps it honest: retrying
clients lose nothing and duplicate nothing while a replica dies and Redis restarts; and its
count finds lost, duplicated, mismatched and stray rows when there are some."""

from __future__ import annotations

import pytest

from bench.chaos import ChaosPlan, RequestOutcome, run_chaos, tally
from tests.services import PrivateRedis, new_or_skip


def _outcome(client: str, key: str, hashes: list[str], ids: list[str] | None) -> RequestOutcome:
    return RequestOutcome(client=client, request_key=key, hashes=hashes, query_ids=ids)


def test_the_count_finds_lost_duplicated_mismatched_and_stray_rows() -> None:
    outcomes = [
        _outcome("c0", "k-whole", ["h0", "h1"], ["q0", "q1"]),
        _outcome("c0", "k-lost", ["h2", "h3"], ["q2", "q3"]),
        _outcome("c1", "k-doubled", ["h4"], ["q4"]),
        _outcome("c1", "k-other-ids", ["h5"], ["q5"]),
        _outcome("c2", "k-never", ["h6"], None),  # its client gave up on it
    ]
    rows = [
        ("c0", "k-whole", 1, "q1", "h1"),  # order in the table does not matter
        ("c0", "k-whole", 0, "q0", "h0"),
        ("c0", "k-lost", 0, "q2", "h2"),  # position 1 never logged
        ("c1", "k-doubled", 0, "q4", "h4"),
        ("c1", "k-doubled", 0, "q4b", "h4"),
        ("c1", "k-other-ids", 0, "q5-else", "h5"),
        ("c2", "k-never", 0, "q6", "h6"),
        ("c2", None, None, "q7", "h7"),  # no request sent it
    ]
    figures = tally(outcomes, rows)
    assert figures["requests"] == 5 and figures["answered_requests"] == 4
    assert figures["answered_images"] == 6 and figures["logged_rows"] == 8
    assert figures["lost_rows"] == 1 and figures["lost_requests"] == 1
    assert figures["duplicated_rows"] == 1
    assert figures["mismatched_requests"] == 1
    assert figures["stray_rows"] == 1
    assert figures["logged_unanswered_rows"] == 1
    assert figures["unfinished_requests"] == 1 and figures["unfinished_clients"] == 1


def test_the_chaos_redis_keeps_its_state_through_a_sigkill() -> None:
    """The benchmark restarts Redis expecting it back with its state, as a deployed one is."""
    with new_or_skip(lambda: PrivateRedis(appendonly=True)) as server:
        with server.client() as connection:
            connection.set("kept", "yes")
        server.restart()  # SIGKILL, then start
        with server.client() as connection:
            assert connection.get("kept") == b"yes"
    with new_or_skip(PrivateRedis) as server:  # the default keeps nothing
        with server.client() as connection:
            connection.set("kept", "yes")
        server.restart()
        with server.client() as connection:
            assert connection.get("kept") is None


@pytest.mark.slow
def test_retrying_clients_lose_and_duplicate_nothing_through_a_replica_kill_and_redis_restart(
    tmp_path,
) -> None:
    plan = ChaosPlan(
        clients=8,
        requests=5,
        events=("redis", "kill-a"),
        duration_s=10.0,
        min_gap_s=1.0,
        hang_up_rate=0.2,  # some answers lost on the way: their retries must not log twice
        deadline_s=60.0,
        max_seconds=120.0,
        log_dir=tmp_path,
        progress=False,
    )
    result = new_or_skip(lambda: run_chaos(plan))
    assert [event.name for event in result.events] == ["redis", "kill-a"], result.skipped_events
    assert all(event.error is None for event in result.events), result.events
    figures = result.figures
    assert figures["answered_requests"] == figures["requests"] == 40
    assert figures["logged_rows"] == figures["answered_images"] == figures["images"]
    assert figures["lost_rows"] == figures["duplicated_rows"] == 0, figures
    assert figures["mismatched_requests"] == figures["stray_rows"] == 0, figures
    assert figures["unfinished_clients"] == 0, figures
    assert figures["retries"] > 0, result.statuses  # the faults did reach the clients
    assert result.ok
