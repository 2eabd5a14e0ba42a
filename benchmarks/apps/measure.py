"""What ``benchmarks.server`` serves: every variant of one app in one process, each request's CPU time taken.

``wsgi`` for gunicorn, ``asgi`` for uvicorn. Environment: ``BENCH_FRAMEWORK`` (flask, fastapi,
django), ``BENCH_COMPARE`` (poolguard, telemetry), ``BENCH_SAMPLED`` (non-empty: every trace sampled),
``BENCH_CPU_FILE`` (where ``/_bench/dump`` writes).

``/<variant>/select1`` goes to that variant's app. Around the app call, the body and ``close()``
(where all of poolguard's work happens) the wrapper takes the serving thread's CPU time
(``time.thread_time_ns``: not its waits for the GIL or the database). ``/_bench/reset`` forgets
the samples so far (the warm-up's); ``/_bench/dump`` writes them, with the count of answers that
were not 200, as JSON. With ``BENCH_COMPARE=telemetry`` the OpenTelemetry SDK is installed first
and each request runs under a span of its own, as a framework instrumentation makes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from opentelemetry import trace

from benchmarks.apps import common

FRAMEWORK = os.environ["BENCH_FRAMEWORK"]
COMPARE = os.environ["BENCH_COMPARE"]
VARIANTS = common.variants(FRAMEWORK, COMPARE)

if COMPARE == "telemetry":
    common.install_sdk(sampled=bool(os.environ.get("BENCH_SAMPLED")))
    _tracer = trace.get_tracer("benchmarks")

    def _request_span() -> contextlib.AbstractContextManager[object]:
        return _tracer.start_as_current_span("GET /select1")
else:
    _request_span = contextlib.nullcontext


def _load() -> dict[str, Any]:
    if FRAMEWORK == "django":
        from benchmarks.apps.django_project.wsgi import handlers  # noqa: PLC0415

        return handlers(VARIANTS)
    if FRAMEWORK == "flask":
        from benchmarks.apps import flask_app as module  # noqa: PLC0415
    else:
        from benchmarks.apps import fastapi_app as module  # type: ignore[no-redef]  # noqa: PLC0415
    return {variant: module.make(variant) for variant in VARIANTS}  # in order: ``otel`` last


apps = _load()
_cpu: dict[str, list[int]] = {variant: [] for variant in VARIANTS}
_not_200: dict[str, int] = dict.fromkeys(VARIANTS, 0)
_thread_cpu = time.thread_time_ns
_STRIP = FRAMEWORK != "django"  # Django routes ``/<variant>/select1`` itself


def _control(path: str) -> None:
    if path == "/_bench/dump":
        with open(os.environ["BENCH_CPU_FILE"], "w") as out:
            json.dump({"cpu_ns": _cpu, "not_200": _not_200}, out)
    elif path == "/_bench/reset":
        for samples in _cpu.values():
            samples.clear()
        for variant in _not_200:
            _not_200[variant] = 0


def _variant(path: str) -> str | None:
    variant = path.split("/", 2)[1]
    return variant if variant in apps else None


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    variant = _variant(path)
    if variant is None:
        _control(path)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]
    if _STRIP:
        environ["PATH_INFO"] = path[len(variant) + 1 :]

    def checked(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not status.startswith("200"):
            _not_200[variant] += 1
        return start_response(status, headers, exc_info)

    with _request_span():
        start = _thread_cpu()
        result = apps[variant](environ, checked)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        _cpu[variant].append(_thread_cpu() - start)
    return [body]


Message = MutableMapping[str, Any]


async def asgi(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """One request at a time (one wrk connection): the response is held back until the app has returned.

    Work an app does after sending its response (a dependency's exit) would otherwise overlap the
    next request and land in that one's time.
    """
    path = scope["path"]
    variant = _variant(path)
    if variant is None:
        _control(path)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"done"})
        return
    inner = path[len(variant) + 1 :]
    scope = {**scope, "path": inner, "raw_path": inner.encode()}
    messages: list[Message] = []

    async def hold(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            _not_200[variant] += 1
        messages.append(message)

    with _request_span():
        start = _thread_cpu()
        await apps[variant](scope, receive, hold)
        _cpu[variant].append(_thread_cpu() - start)
    for message in messages:
        await send(message)
