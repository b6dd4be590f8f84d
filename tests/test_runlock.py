"""The output-folder lock (tpp_monai.runlock) under concurrency and PID reuse: of many runs that start
together over a killed run's lock exactly one gets in; a live PID that is not the lock's owner (reused)
is recognised; a lock without a start time says that PIDs can be reused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import time

import pytest

from tpp_monai import runlock
from tpp_monai.runlock import LOCK_NAME, OutputFolderLocked, OutputLock

STARTERS, TRIALS = 6, 8


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _stale_lock(folder, pid: int, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0.0,
                                                "what": "run", "token": "old", **extra}))


def _starter(folder: str, start, tried, results) -> None:
    start.wait(30)
    lock = OutputLock(folder)
    try:
        lock.acquire()
        got = True
    except OutputFolderLocked:
        got = False
    results.put(got)
    tried.wait(30)  # hold the lock until every starter has tried
    lock.release()


def test_runs_starting_together_over_a_stale_lock_let_exactly_one_in(tmp_path, monkeypatch):
    real = runlock._pid_alive

    def slow_pid_alive(pid: int) -> bool:  # widen the window between reading the stale lock and removing it
        time.sleep(0.02)
        return real(pid)

    monkeypatch.setattr(runlock, "_pid_alive", slow_pid_alive)
    ctx = mp.get_context("fork")
    winners = []
    for trial in range(TRIALS):
        folder = tmp_path / f"t{trial}"
        _stale_lock(folder, _dead_pid())
        start, tried, results = ctx.Barrier(STARTERS), ctx.Barrier(STARTERS), ctx.Queue()
        procs = [ctx.Process(target=_starter, args=(str(folder), start, tried, results)) for _ in range(STARTERS)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        winners.append(sum(got))
        assert not (folder / LOCK_NAME).exists()  # the winner released it
        assert not list(folder.glob("*.tmp"))  # no temporary lock file left behind
    assert winners == [1] * TRIALS


def test_a_reused_pid_is_recognised_as_stale(tmp_path, caplog):
    other = subprocess.Popen(["sleep", "30"])  # alive, but not the process that wrote the lock
    try:
        _stale_lock(tmp_path, other.pid, proc_start="1")  # started at another time than `other`
        with caplog.at_level("WARNING", logger="tpp_monai"):
            lock = OutputLock(tmp_path).acquire()
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"PID {other.pid}, now reused by another process" in caplog.text
        lock.release()
        # a lock of a live PID with no start time (an older lock) is refused, with the hint
        _stale_lock(tmp_path, other.pid)
        with pytest.raises(OutputFolderLocked, match=rf"PID {other.pid}, locked since .*PID is reused.*delete the lock"):
            OutputLock(tmp_path).acquire()
        # the true owner (matching start time) is refused without the hint
        _stale_lock(tmp_path, other.pid, proc_start=runlock._proc_start(other.pid), boot=runlock._boot_id())
        with pytest.raises(OutputFolderLocked) as ei:
            OutputLock(tmp_path).acquire()
        assert "PID is reused" not in str(ei.value) and f"PID {other.pid}" in str(ei.value)
    finally:
        other.kill()
        other.wait(10)


def test_the_lock_records_start_time_and_boot(tmp_path):
    lock = OutputLock(tmp_path).acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["proc_start"] == runlock._proc_start(os.getpid()) and owner["boot"] == runlock._boot_id()
    assert owner["proc_start"] is not None  # Linux CI has /proc
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
