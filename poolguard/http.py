"""The one mapping from core outcomes to HTTP, so every adapter answers byte for byte the same.

Adapters never build a 503 or a health body themselves: they turn :class:`HttpResponse` into their
framework's response object. The 503 for ``Unavailable`` carries ``Retry-After`` in whole seconds
(at least 1, since 0 would invite an instant retry storm) and ``Cache-Control: no-store`` so no
proxy serves a stale outage; the body names the reason but never the pool's URL or the error text.
It also reads the one request header poolguard acts on, ``X-Request-Start`` (:func:`queue_time`).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from poolguard.config import HealthToken, UnavailableBody
from poolguard.errors import Unavailable
from poolguard.health import HealthReport

logger = logging.getLogger("poolguard")

JSON_CONTENT_TYPE = "application/json"
HEALTH_METHODS = ("GET", "HEAD")
"""The methods the health route answers; any other method on its path goes on to the app."""

REQUEST_START_HEADER = "X-Request-Start"

EPOCH_2000 = 946_684_800.0
"""2000-01-01 in epoch seconds: a timestamp's unit is the largest one that puts it after this (New
Relic's and Scout's rule): 1.7e9 is seconds, 1.7e12 milliseconds, 1.7e15 microseconds."""

MAX_QUEUE_TIME = 3600.0
"""Seconds of queueing beyond which the header is not believed (a wrong clock or a wrong unit)."""

MAX_CLOCK_SKEW = 5.0
"""Seconds a start may lie in the future and still count, as "no queueing": the proxy's clock and ours
disagree a little. Further ahead, the header is not believed."""

_REQUEST_START = re.compile(r"\s*(?:t=)?(\d{1,19}(?:\.\d{1,9})?)\s*", re.ASCII)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A framework-neutral response: status, headers (in order) and the encoded body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _encode(payload: Mapping[str, Any] | list[Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def retry_after_seconds(retry_after: float) -> int:
    """``Retry-After`` must be whole seconds; round up and never below 1."""
    if not math.isfinite(retry_after):
        return 1
    return max(1, math.ceil(retry_after))


def unavailable_payload(exc: Unavailable) -> dict[str, Any]:
    """poolguard's own 503 body, as a dict (a ``unavailable_body`` hook may start from it)."""
    return {"error": "database_unavailable", "reason": exc.reason, "retry_after": retry_after_seconds(exc.retry_after)}


def unavailable_response(exc: Unavailable, body: UnavailableBody | None = None) -> HttpResponse:
    """The 503 every adapter returns when a request needs the database and cannot have it.

    ``body`` is the ``unavailable_body`` option (``config.http.unavailable_body``): it renders the body
    and names its content type, the app's way (DRF's error shape, problem+json); the status,
    ``Retry-After`` and ``Cache-Control`` stay poolguard's. A hook that raises or returns something
    else is logged (without the traceback) and poolguard's own body is sent: the 503 still goes out.
    """
    seconds = retry_after_seconds(exc.retry_after)
    rendered = _render(body, exc) if body is not None else None
    content_type, encoded = rendered or (JSON_CONTENT_TYPE, _encode(unavailable_payload(exc)))
    return HttpResponse(
        status=503,
        headers=(
            ("Content-Type", content_type),
            ("Retry-After", str(seconds)),
            ("Cache-Control", "no-store"),
        ),
        body=encoded,
    )


def _render(hook: UnavailableBody, exc: Unavailable) -> tuple[str, bytes] | None:
    """The hook's (content type, encoded body), or None after logging why it cannot be used."""
    try:
        result = hook(exc)
    except Exception as error:
        logger.error("poolguard: unavailable_body raised %s; sent poolguard's own 503 body", type(error).__name__)
        return None
    if isinstance(result, tuple) and len(result) == 2:
        payload, content_type = result
        if isinstance(content_type, str) and content_type and "\n" not in content_type and "\r" not in content_type:
            if isinstance(payload, bytes):
                return content_type, payload
            if isinstance(payload, str):
                return content_type, payload.encode()
            if isinstance(payload, Mapping | list):
                try:
                    return content_type, _encode(payload)
                except (TypeError, ValueError):
                    pass
    logger.error(
        "poolguard: unavailable_body returned %s, not (bytes | str | dict | list, content type); "
        "sent poolguard's own 503 body",
        type(result).__name__,
    )
    return None


def health_response(report: HealthReport, *, detail: bool) -> HttpResponse:
    """200 for ok/degraded, 503 for unavailable; the full report only when ``detail`` is allowed."""
    payload = report.to_dict() if detail else {"status": report.status}
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON_CONTENT_TYPE), ("Cache-Control", "no-store"))
    if report.http_status == 503:
        headers = (*headers, ("Retry-After", "1"))
    return HttpResponse(status=report.http_status, headers=headers, body=_encode(payload))


def queue_time(header: str | None, now: float) -> float | None:
    """Seconds the request queued in front of the app, from its ``X-Request-Start`` value; None if unknown.

    The value is the time the request entered the platform, in seconds since the epoch: ``t=`` and a
    number in seconds (nginx ``t=${msec}``: ``t=1700000000.123``), milliseconds (Heroku: 13 digits) or
    microseconds (``t=`` and 16 digits), told apart by magnitude (:data:`EPOCH_2000`). ``now`` is the
    wall clock (``time.time()``). A start a little in the future (clock skew) is 0. Absent, malformed
    or implausible (more than :data:`MAX_QUEUE_TIME` ago, more than :data:`MAX_CLOCK_SKEW` ahead) is
    None: a header the app cannot read must never fail or shed its request. Of several values (a
    header set twice and joined with commas) the last one counts, the one the nearest proxy set.
    """
    if not header:
        return None
    match = _REQUEST_START.fullmatch(header.rpartition(",")[2])
    if match is None:
        return None
    start = float(match.group(1))
    for scale in (1e6, 1e3, 1.0):
        if start > EPOCH_2000 * scale:
            start /= scale
            break
    else:
        return None
    queued = now - start
    if queued < -MAX_CLOCK_SKEW or queued > MAX_QUEUE_TIME:
        return None
    return max(queued, 0.0)


def detail_allowed(mode: str, token: HealthToken, request: Any, authorization: str | None) -> bool:
    """Whether this caller may see the health detail (``health_detail`` and ``health_token``)."""
    if mode == "always":
        return True
    if mode != "when-authorized" or token is None:
        return False
    if callable(token):
        return bool(token(request))
    if authorization is None:
        return False
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())
