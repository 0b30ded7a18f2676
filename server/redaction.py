"""Secrets never reach a log line: a logging filter that masks them wherever they appear.

API keys travel in the ``Authorization`` header, which nothing logs; but uvicorn's access
log prints each request's path with its query string, and the dashboard's one-time login
link carries the admin token there (``/dashboard?token=...``). A client may also paste a key
where it does not belong. The filter masks ``token=``/``key=`` query values and anything
shaped like an API key, in the message and in its arguments, before any handler formats it.
"""

from __future__ import annotations

import logging
import re

from server.keys import KEY_PREFIX

_PATTERNS = (
    (re.compile(r"(?i)\b((?:admin_)?token|key|api_key)=[^&\s\"']+"), r"\1=[redacted]"),
    (re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]{8,}"), KEY_PREFIX + "[redacted]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/\-]+=*"), r"\1 [redacted]"),
)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


def redacting_log_config(base: dict, level: str) -> dict:
    """uvicorn's logging config with the filter on every handler, and our loggers added."""
    config = {
        **base,
        "filters": {**base.get("filters", {}), "redact": {"()": f"{__name__}.RedactSecrets"}},
    }
    config["handlers"] = {
        name: {**handler, "filters": [*handler.get("filters", []), "redact"]}
        for name, handler in base["handlers"].items()
    }
    config["loggers"] = {
        **base["loggers"],
        "server": {"handlers": ["default"], "level": level.upper()},
        "defense": {"handlers": ["default"], "level": level.upper()},
    }
    return config
