"""The project's WSGI handlers, one per variant: ``handlers()``."""

from __future__ import annotations

import inspect
import os
from typing import Any

from benchmarks.apps import common


def handlers(variants: tuple[str, ...]) -> dict[str, Any]:
    """``bare`` is a handler built without poolguard's middleware; every other variant shares one."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.apps.django_project.settings")
    from django.conf import settings  # type: ignore[import-untyped]  # noqa: PLC0415
    from django.core.handlers.wsgi import WSGIHandler  # type: ignore[import-untyped]  # noqa: PLC0415
    from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]  # noqa: PLC0415
    from django.test.utils import override_settings  # type: ignore[import-untyped]  # noqa: PLC0415

    application = get_wsgi_application()
    result = dict.fromkeys(variants, application)
    if "bare" in variants:
        with override_settings(MIDDLEWARE=[name for name in settings.MIDDLEWARE if not name.startswith("poolguard.")]):
            result["bare"] = WSGIHandler()
    for variant in variants:
        if options := common.guard_options(variant):
            use_providers(variant, **options)
    return result


def use_providers(alias: str, **providers: Any) -> None:
    """Gives the guard of one alias the telemetry ``Guard(..., **providers)`` would have given it.

    ``POOLGUARD`` takes one tracer and meter provider for the whole project, so this is the one
    place a benchmark reaches into poolguard: the alias's guard's gate (``guard.gate`` since the
    restructuring of issue 11, ``guard.monitor`` before it) gets a telemetry object of the same
    class, built for these providers from what the old one keeps of its own arguments (its pool
    name, and its ``counts`` or, since the restructuring, ``snapshot``).
    """
    from django.apps import apps  # type: ignore[import-untyped]  # noqa: PLC0415

    guard = apps.get_app_config("poolguard").state.guards[alias]
    gate = getattr(guard, "gate", None) or guard.monitor
    old = gate.telemetry
    kept = {name: getattr(old, name) for name in inspect.signature(type(old)).parameters if hasattr(old, name)}
    gate.telemetry = type(old)(**{"db_system": "postgresql", **kept, **providers})
