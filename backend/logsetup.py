"""Log lines of ``burrow serve`` (``--log-format text|json|logfmt``), on stderr.

- ``text``: ``2026-12-01T21:30:41.123+00:00 WARNING burrow.edge: message``
- ``json``: one object a line: ``{"t": ..., "lvl": "warn", "logger": ..., "msg": ...}``
- ``logfmt``: ngrok's style, ``t=... lvl=warn obj=burrow.edge msg="..."``
  (:mod:`backend.logfmt`).

Stdout stays for the ``--json`` event lines, so a supervisor can read events and logs
apart.  Callers pass addresses, names and ids, never secrets.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from backend.logfmt import _quote

__all__ = ["configure"]

#: ngrok's level words in logfmt and JSON lines
_LEVELS = {"DEBUG": "dbug", "INFO": "info", "WARNING": "warn", "ERROR": "eror", "CRITICAL": "crit"}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _message(record: logging.LogRecord) -> str:
    return record.getMessage()


def _traceback(record: logging.LogRecord) -> str | None:
    """The traceback of a logged exception (a bug), kept whole: it is what fixes it."""
    if record.exc_info and record.exc_info[1] is not None:
        return logging.Formatter().formatException(record.exc_info)
    return None


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record)} {record.levelname} {record.name}: {_message(record)}"
        tb = _traceback(record)
        return f"{line}\n{tb}" if tb else line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "t": _time(record),
            "lvl": _LEVELS.get(record.levelname, record.levelname.lower()),
            "logger": record.name,
            "msg": _message(record),
        }
        tb = _traceback(record)
        if tb:
            obj["exc"] = tb
        return json.dumps(obj, separators=(",", ":"))


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        lvl = _LEVELS.get(record.levelname, record.levelname.lower())
        line = f"t={_time(record)} lvl={lvl} obj={_quote(record.name)} msg={_quote(_message(record))}"
        tb = _traceback(record)
        return f"{line} exc={_quote(tb)}" if tb else line


_FORMATTERS = {"text": TextFormatter, "json": JSONFormatter, "logfmt": LogfmtFormatter}


def configure(fmt: str = "text", level: str = "info") -> logging.Handler:
    """Send burrow's log records to stderr in ``fmt``, from ``level`` up; one line each
    in json and logfmt (a bug's traceback goes in the line's ``exc`` field)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FORMATTERS[fmt]())
    for name in ("burrow", "backend"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
    return handler
