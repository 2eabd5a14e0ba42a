"""What the doctor found: findings with a severity and what to do, gathered in one report.

A finding is a plain value (no driver type, no query text), so the report is safe to print, to
log and to return as JSON: it names applications, states, durations and process ids, never a
password, a DSN or a statement's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]

SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")
"""Most severe first: the order findings are shown in."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the doctor saw; ``action`` says what to do about it (empty for plain information)."""

    severity: Severity
    code: str
    """A stable identifier, e.g. ``pg.idle_in_transaction``, for scripts and alert rules."""
    message: str
    action: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message, "action": self.action}


@dataclass(slots=True)
class Report:
    """The doctor's answer for one server: what it is, the numbers it read, and the findings."""

    target: str
    """The server as shown to people: the URL with its password redacted."""
    kind: str
    """``postgresql``, ``mysql`` or ``pgbouncer``."""
    server: str = ""
    """The server's version string, when it answered."""
    facts: dict[str, Any] = field(default_factory=dict)
    """The figures the findings rest on (connection counts, limits, pool rows), JSON-ready."""
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    """How long the diagnosis took, connect included."""

    def add(self, severity: Severity, code: str, message: str, action: str = "") -> None:
        self.findings.append(Finding(severity, code, message, action))

    @property
    def sorted_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda finding: SEVERITIES.index(finding.severity))

    @property
    def critical(self) -> bool:
        return any(finding.severity == "critical" for finding in self.findings)

    @property
    def status(self) -> Severity | Literal["ok"]:
        """The most severe finding's severity, ``ok`` when there is none beyond information."""
        worst = self.sorted_findings[0].severity if self.findings else "info"
        return "ok" if worst == "info" else worst

    @property
    def exit_code(self) -> int:
        """1 when any finding is critical, else 0 (warnings do not fail a script)."""
        return 1 if self.critical else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "server": self.server,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "facts": self.facts,
            "findings": [finding.to_dict() for finding in self.sorted_findings],
        }


_MARKS: dict[str, str] = {"critical": "CRITICAL", "warning": "WARNING ", "info": "info    "}


def render_text(report: Report) -> str:
    """The report for people: one header, then the findings, most severe first, each with what to do."""
    server = f" ({report.server})" if report.server else ""
    lines = [f"poolguard doctor: {report.kind} at {report.target}{server}, {report.seconds:.2f} s"]
    for finding in report.sorted_findings:
        lines.append(f"  {_MARKS[finding.severity]} {finding.code}: {finding.message}")
        if finding.action:
            lines.append(f"           what to do: {finding.action}")
    if not report.findings:
        lines.append("  nothing to report")
    lines.append(f"status: {report.status}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a duration or a fill level becomes a finding; critical past the ``*_critical`` values."""

    idle_in_transaction: float = 5.0
    """Seconds a session may sit idle inside a transaction before it is a warning (it holds locks and a slot)."""
    idle_in_transaction_critical: float = 60.0
    long_query: float = 30.0
    """Seconds a statement may run before it is a warning."""
    long_query_critical: float = 300.0
    lock_wait_critical: float = 60.0
    """Seconds a session may wait on a lock before it is critical (any lock wait is a warning)."""
    many: int = 5
    """Sessions past a threshold at once that make the finding critical whatever their durations."""
    headroom_warning: float = 0.75
    """Fraction of the usable connection slots in use that makes a warning."""
    headroom_critical: float = 0.9
    wait_critical: float = 5.0
    """Seconds PgBouncer's oldest waiting client may wait before it is critical."""

    def scaled(self, *, idle_in_transaction: float | None = None, long_query: float | None = None) -> Thresholds:
        """These thresholds with new warning values; the critical ones keep their ratio to them."""
        idle = self.idle_in_transaction if idle_in_transaction is None else idle_in_transaction
        long = self.long_query if long_query is None else long_query
        return replace(
            self,
            idle_in_transaction=idle,
            idle_in_transaction_critical=idle * self.idle_in_transaction_critical / self.idle_in_transaction,
            long_query=long,
            long_query_critical=long * self.long_query_critical / self.long_query,
        )


def headroom(
    report: Report, *, used: int, usable: int, thresholds: Thresholds, code: str, what: str, action: str
) -> None:
    """A finding on how full the server's connection slots are (``usable``: what ordinary roles may use)."""
    free = usable - used
    report.facts["connections_used"] = used
    report.facts["connections_usable"] = usable
    report.facts["connections_free"] = free
    fill = used / usable if usable > 0 else 1.0
    message = f"{used} of {usable} usable connection slots in use ({fill:.0%}), {free} free ({what})"
    if fill >= thresholds.headroom_critical:
        report.add("critical", code, message, action)
    elif fill >= thresholds.headroom_warning:
        report.add("warning", code, message, action)
    else:
        report.add("info", code, message)
