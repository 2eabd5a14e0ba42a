"""``poolguard budget``'s human output: the numbers, the verdict, and what to change."""

from __future__ import annotations

from poolguard.diagnose.budget import Budget

_VERDICT_LINES = {
    "fits": "fits: the fleet's pools fit, with the margin left free",
    "tight": "tight: it fits, but eats into the margin left for admin sessions, migrations and cron jobs",
    "over": "over: at full load (or during a rollout) the server refuses connections (too many connections)",
}


def render(budget: Budget) -> str:
    fleet, limits = budget.fleet, budget.limits
    lines = [f"poolguard budget: {budget.verdict.upper()}", ""]
    reserved = ", ".join(f"{name} {value}" for name, value in limits.settings.items())
    lines.append(
        f"server     {limits.source}: max_connections {limits.max_connections} - reserved {limits.reserved}"
        f"{f' ({reserved})' if reserved else ''} = {limits.usable} usable; margin {budget.margin} kept free"
        f" ({fleet.margin})"
    )
    lines.append("")
    header = f"{'service':<16} {'pods':>5} {'procs':>5}  {'per process':<22} {'connections':>11}  {'rollout':>8}"
    lines.append(header)
    for service in fleet.services:
        per = f"{service.per_process} ({service.pool_size}+{service.max_overflow}"
        per += f"+{service.other})" if service.other else ")"
        surge = service.surge(fleet.max_surge)
        rollout = f"+{surge}" if surge else "-"
        lines.append(
            f"{service.name:<16} {service.replicas:>5} {service.processes:>5}  {per:<22} "
            f"{service.connections:>11}  {rollout:>8}"
        )
    lines.append(f"{'':<16} {'':>5} {'':>5}  {'pool+overflow(+other)':<22} {budget.demand:>11}")
    lines.append("")
    surge = budget.peak - budget.demand
    rolling = f" while {budget.surging} rolls out (max_surge {fleet.max_surge})" if surge else " (no rollout surge)"
    bouncer = fleet.pgbouncer
    kind = "connections" if bouncer is None else "client connections to PgBouncer"
    lines.append(f"demand     {budget.demand} {kind} at full load; peak {budget.peak}{rolling}")
    if bouncer is not None:
        lines.append(
            f"pgbouncer  {bouncer.instances} instance(s) x {bouncer.server_connections_per_instance} server "
            f"connections = {bouncer.server_connections} on the server; clients {budget.peak} of "
            f"{bouncer.instances} x max_client_conn {bouncer.max_client_conn}"
        )
    lines.append(
        f"headroom   {budget.headroom} connections free at the peak ({limits.usable} - {budget.server_peak}); "
        f"margin {budget.margin}"
    )
    lines.append(f"verdict    {_VERDICT_LINES[budget.verdict]}")
    lines.extend(f"           {reason}" for reason in budget.reasons)
    lines.extend(_suggestions(budget))
    return "\n".join(lines)


def _suggestions(budget: Budget) -> list[str]:
    if budget.verdict == "fits":
        return []
    room = budget.limits.usable - budget.margin
    lines = ["", "what to change"]
    if budget.pool_suggestion is not None:
        lines.append(
            f"  pool sizes that fit: the {room} connections left after the margin, shared in proportion to "
            "each service's demand"
        )
        for suggestion, service in zip(budget.pool_suggestion, budget.fleet.services, strict=True):
            lines.append(
                f"    {suggestion.name:<16} pool_size={suggestion.pool_size} max_overflow={suggestion.max_overflow}"
                f"   (now {service.pool_size}+{service.max_overflow})"
            )
        lines.append(
            "    a process with fewer connections than threads queues the rest: poolguard sheds them after "
            "max_wait (503), or run fewer threads"
        )
    elif budget.no_pool_fit:
        lines.append("  no pool size fits: one connection per process is already too many; put PgBouncer in front")
    bouncer = budget.pgbouncer_suggestion
    if bouncer is not None:
        head = "PgBouncer settings that fit" if budget.fleet.pgbouncer else "or PgBouncer in transaction mode in front"
        lines.append(f"  {head} (integrations/pgbouncer/pgbouncer.ini), per instance ({bouncer.instances}):")
        lines.append(f"    max_db_connections = {bouncer.max_db_connections}")
        lines.append(f"    default_pool_size  = {bouncer.default_pool_size}")
        lines.append(f"    reserve_pool_size  = {bouncer.reserve_pool_size}")
        lines.append(
            f"    max_client_conn    = {bouncer.max_client_conn}   (the fleet's client connections at the peak)"
        )
        if budget.fleet.pgbouncer is None:
            lines.append(
                "    and in the apps: poolguard.create_engine(url, workers=N, pgbouncer=True) (or detected): "
                "2 connections kept open per process"
            )
    elif budget.limits.usable - budget.margin < 1:
        lines.append("  raise max_connections: the margin takes every usable connection")
    lines.append("  or raise max_connections, or run fewer replicas or processes")
    return lines
