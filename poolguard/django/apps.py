"""The Django app: add ``"poolguard.django"`` to INSTALLED_APPS.

The state (monitors, breakers, the SQLAlchemy Guard) is built in :meth:`ready` and kept on this
AppConfig, never in a module global, and rebuilt when a test overrides ``POOLGUARD`` or
``DATABASES``. An invalid ``POOLGUARD`` does not crash ``ready()``: the system checks report it
(``poolguard.E001``/``E002``) and the middleware refuses to start with the same message.
"""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]

from poolguard.django.conf import PoolGuardState, configure_settings
from poolguard.errors import ConfigError

WATCHED_SETTINGS = frozenset({"POOLGUARD", "DATABASES"})


class PoolGuardAppConfig(AppConfig):  # type: ignore[misc]
    name = "poolguard.django"
    label = "poolguard"
    verbose_name = "poolguard"
    default = True

    state: PoolGuardState | None = None
    error: ConfigError | None = None

    def ready(self) -> None:
        from poolguard.django import checks  # noqa: F401, PLC0415  (importing registers the checks, once apps are ready)

        setting_changed.connect(self._setting_changed, dispatch_uid="poolguard.django.setting_changed")
        self.rebuild()

    def _setting_changed(self, *, setting: str, **kwargs: Any) -> None:
        if setting in WATCHED_SETTINGS:
            self.rebuild()

    def rebuild(self) -> None:
        """Closes the current state (removing its hooks) and builds one from the settings now in force."""
        old, self.state = self.state, None
        if old is not None:
            old.close()
        try:
            self.state = PoolGuardState(configure_settings())
            self.error = None
        except ConfigError as exc:
            self.error = exc

    def require_state(self) -> PoolGuardState:
        """The state, or ImproperlyConfigured with the message of what is wrong in POOLGUARD."""
        state = self.state
        if state is None:
            raise ImproperlyConfigured(f"poolguard: {self.error}") from self.error
        return state
