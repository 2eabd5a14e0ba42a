"""How the server's processes and threads are read: configured, gunicorn's options, WEB_CONCURRENCY."""

from __future__ import annotations

import pytest

from poolguard._serving import DEFAULT, gunicorn_option, processes, queue_hidden, threads, threads_advice


@pytest.mark.parametrize(
    ("environ", "argv", "expected"),
    [
        ({}, ["manage.py", "check"], (1, DEFAULT)),
        ({"GUNICORN_CMD_ARGS": "--threads 8"}, [], (8, "gunicorn --threads")),
        ({"GUNICORN_CMD_ARGS": "--threads=6"}, [], (6, "gunicorn --threads")),
        ({}, ["/venv/bin/gunicorn", "-k", "gthread", "--threads", "16", "app:app"], (16, "gunicorn --threads")),
        ({}, ["/usr/bin/python3", "-m", "gunicorn", "--threads", "12", "app:app"], (12, "gunicorn --threads")),
        ({}, ["uvicorn", "--threads", "9"], (1, DEFAULT)),  # not gunicorn's command line
        ({"GUNICORN_CMD_ARGS": "--threads 4"}, ["gunicorn", "--threads", "10"], (10, "gunicorn --threads")),
        ({"GUNICORN_CMD_ARGS": "--threads nope"}, [], (1, DEFAULT)),
        ({"GUNICORN_CMD_ARGS": "--threads 'unclosed"}, [], (1, DEFAULT)),
    ],
)
def test_threads(environ: dict[str, str], argv: list[str], expected: tuple[int, str]) -> None:
    assert threads(None, environ, argv) == expected


def test_a_configured_count_wins() -> None:
    assert threads(3, {"GUNICORN_CMD_ARGS": "--threads 8"}, []) == (3, "THREADS")
    assert processes(2, {"WEB_CONCURRENCY": "5"}, []) == (2, "PROCESSES")


def test_processes() -> None:
    assert processes(None, {}, ["gunicorn", "-w", "4"]) == (4, "gunicorn --workers")
    assert processes(None, {}, ["gunicorn", "-w4"]) == (4, "gunicorn --workers")
    assert processes(None, {"WEB_CONCURRENCY": "3"}, []) == (3, "WEB_CONCURRENCY")
    assert processes(None, {}, []) == (1, DEFAULT)


def test_gunicorn_option_takes_the_last_one_given() -> None:
    assert gunicorn_option({"GUNICORN_CMD_ARGS": "-w 2 --workers 3"}, ("-w", "--workers")) == "3"


def test_the_queue_is_hidden_when_threads_do_not_outnumber_connections() -> None:
    assert queue_hidden(5, 5)
    assert queue_hidden(4, 5)
    assert not queue_hidden(6, 5)
    assert not queue_hidden(4, None)  # an unbounded pool queues nowhere
    advice = threads_advice(4, "gunicorn --threads", 5)
    assert "4 threads per process (gunicorn --threads)" in advice
    assert "gunicorn --threads 10" in advice
