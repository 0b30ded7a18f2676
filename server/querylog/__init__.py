"""The query log (one row per answered query) and the alerts, written off the request path.

The request handler hands the writer plain arrays and dicts, one request at a time; a
background thread does the costly part (PNG encoding, hashing, the database round trip) and
commits several requests per transaction. A request's rows are never split across
transactions, so a crash or a disconnect leaves all of a request's rows or none.

Two modes (``MLAAS_LOG_MODE``):

``durable`` (the default)
    The handler waits for its rows' commit before it answers. The writer commits whatever has
    queued while the previous commit ran (a group commit), so waiting costs one round trip,
    not one per request. A failed commit fails the requests in it: they get 503 and their
    queries are not logged, so the log holds the answered queries, even if the database goes
    away. Their alerts are kept and written once it is back: the detectors' state already
    says the client was flagged, so no later request would raise them again. A request that
    waits longer than its timeout gets 503 too, but its rows stay queued and are logged if
    the commit succeeds later: the log may then hold a query whose answer never reached the
    client (the safe side for detection), and a retry under the same Idempotency-Key is
    answered from those rows.
``buffered``
    The handler answers at once; rows wait in memory (at most ``max_buffered_rows``) for the
    writer. While the database is away the writer parks them in a local SQLite spool, which
    it empties into the database once it answers again (after a restart too), so answers
    keep flowing through an outage and a crash during one loses nothing. Without a spool the
    rows stay in memory and the write is retried with backoff. Writes are idempotent: a row
    already logged, by id or by (client, request_key, position) (one idempotent request
    answered twice during an outage, by two workers or before and after a restart), is
    skipped with a warning, so a duplicate can never jam the spool or the writer.

Errors are told apart: an outage (connection refused, lost or timed out) is retried quietly
with backoff; any other error (a constraint violation, say) is a warning, at most once a
minute while it repeats, never mistaken for "the database is still away".
"""

from server.options import LogMode
from server.querylog.queries import (
    count_queries,
    fetch_alerts,
    fetch_queries,
    fetch_request,
    fetch_statistics,
    logged_flags,
    record_to_dict,
    request_logged,
)
from server.querylog.records import (
    DuplicateRequest,
    LogUnavailable,
    PendingQuery,
    _to_row,
    image_sha256,
    is_outage,
)
from server.querylog.spool import Moved, Spool, insert_new_queries
from server.querylog.writer import QueryLogWriter, wait_for_commit

__all__ = [
    "DuplicateRequest",
    "LogMode",
    "LogUnavailable",
    "Moved",
    "PendingQuery",
    "QueryLogWriter",
    "Spool",
    "_to_row",
    "count_queries",
    "fetch_alerts",
    "fetch_queries",
    "fetch_request",
    "fetch_statistics",
    "image_sha256",
    "insert_new_queries",
    "is_outage",
    "logged_flags",
    "record_to_dict",
    "request_logged",
    "wait_for_commit",
]
