"""Helpers shared by the ngff-convert tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A failed command: nonzero exit, one error line on stderr naming ``words``, last
    (after any log of what the converter found before it failed), no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("ngff-convert: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def kill_once_written(proc: subprocess.Popen, written: Callable[[], int], at_least: int = 3,
                      timeout: float = 300) -> None:
    """SIGKILL ``proc`` (no clean-up possible) once ``written()`` reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if written() >= at_least:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before it could be killed: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
