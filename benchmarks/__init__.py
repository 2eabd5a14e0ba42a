"""What poolguard costs, measured; figures and commands in RESULTS.md beside this file.

Run from the repository root (``python -m benchmarks.<script>``):

- ``benchmarks.checkout``: one checkout through a Guard against the bare engine, in process;
- ``benchmarks.server``: per request under a real server (gunicorn, uvicorn), every variant of one
  app served by one server process, requests alternating: poolguard's cost (``--compare poolguard``)
  and its telemetry's (``--compare telemetry``).
- ``benchmarks.doctor``: ``poolguard doctor``'s wall time as a fresh process, on healthy servers
  (PostgreSQL, MariaDB, PgBouncer's admin console) and on a silent or refusing one.

The apps are real modules under ``benchmarks/apps/``.
"""
