"""Crash safety: a killed conversion looks incomplete, and --resume finishes it without
rewriting what was already written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ngff_helpers import kill_once_written

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
CMU = "aperio/CMU-1-Small-Region.svs"



def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ngff_convert", *map(str, args)]


@pytest.mark.parametrize("codec", ["dlwsi", "jpeg"])
def test_resume_after_kill(slides, tmp_path, codec):
    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", codec, "--workers", "1", "--shard", "1",
            "--no-progress"]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ.copy())
    work = tmp_path / "out.zarr.incomplete"  # a local store is written beside its target
    level0 = work / "0" / "c"

    def objects() -> list[Path]:
        """Chunk objects written so far (zarr's *.partial temp files are not objects)."""
        return [p for p in level0.rglob("*") if p.is_file() and p.suffix != ".partial"] \
            if level0.exists() else []

    kill_once_written(proc, lambda: len(objects()))
    first = {p.relative_to(work): p.stat().st_mtime_ns for p in objects()}
    assert first
    # a half-written store never looks complete, nor takes the target's name
    assert not out.exists()
    attrs = json.loads((work / "zarr.json").read_text())["attributes"]
    assert "ome" not in attrs and attrs["ngff_convert"]["complete"] is False
    info = subprocess.run(cli("info", out), capture_output=True, text=True)
    assert info.returncode != 0 and "incomplete" in info.stderr
    again = subprocess.run(cli(*args), capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr
    # resume finishes it, leaving every chunk object of the first run untouched
    done = subprocess.run(cli(*args, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stdout
    # the quality the killed run chose for --target-ssim (dlwsi's default) is kept
    assert "choosing" not in done.stderr
    assert "found" in done.stderr and "remain" in done.stderr  # what it resumed
    assert not work.exists()
    for rel, mtime in first.items():  # renamed into place, never rewritten
        assert (out / rel).stat().st_mtime_ns == mtime, rel
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["multiscales"] and attrs["ngff_convert"]["complete"] is True
    # the result equals an uninterrupted conversion
    fresh = tmp_path / "fresh.zarr"
    subprocess.run(cli(slides / CMU, fresh, "--codec", codec, "--shard", "1",
                       "--no-progress"), check=True, capture_output=True)
    resumed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    whole = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    assert resumed == whole
    for rel in whole:
        if "/c/" in rel:
            assert (out / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    # resuming a complete store does nothing
    noop = subprocess.run(cli(*args, "--resume"), capture_output=True, text=True)
    assert noop.returncode == 0 and "already complete" in noop.stderr


def test_resume_with_other_settings_is_refused(slides, tmp_path):
    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", "jpeg", "--no-progress"]
    proc = subprocess.Popen(cli(*args, "--workers", "1"), stderr=subprocess.PIPE)
    work = tmp_path / "out.zarr.incomplete"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (work / "0" / "zarr.json").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not (work / "zarr.json").exists():
        pytest.skip("killed before the store was created")
    attrs = json.loads((work / "zarr.json").read_text())["attributes"]
    if "ome" in attrs:
        pytest.skip("conversion finished before it could be killed")
    bad = subprocess.run(cli(*args, "--resume", "--glass", "keep"), capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "different settings" in bad.stderr
    assert "glass was 'fill', now 'keep'" in bad.stderr  # says which option differs
    # one error line, last (after the log of what was found in the slide)
    lines = bad.stderr.strip().splitlines()
    assert [line.startswith("ngff-convert: error") for line in lines].count(True) == 1
    assert lines[-1].startswith("ngff-convert: error")
