"""Crash safety at random points: ``ngff-convert`` is SIGKILLed at a random moment
(seeded: after a random number of stored objects plus a random delay, or at a random
time from start, possibly before the store exists or after it is finished), locally and
on S3 (moto's server on loopback). Each time:

- the killed store never claims to be complete unless the conversion really finished
  (no ``multiscales``, ``ngff_convert.complete`` false, ``info`` says incomplete);
- ``--resume`` completes it, and ``ngff-convert verify`` passes on the result.

``tests/test_ngff_resume.py`` checks the finer points of one kill (no object rewritten,
identical to an uninterrupted run); this module covers many kill points. More seeds:
``DLWSI_CRASH_SEEDS=20 pytest tests/test_crash_safety.py`` or
``benchmarks/crash_safety.py``; with ``DLWSI_CRASH_REPORT=file.jsonl`` every kill is
recorded there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_ngff_s3 import BUCKET, s3, s3_env  # noqa: F401 - s3 is a fixture

from ngff_convert import ConvertError, cli
from ngff_convert.options import Options
from ngff_convert.reading import info
from ngff_convert.verify import verify

CMU = "aperio/CMU-1-Small-Region.svs"
SEEDS = int(os.environ.get("DLWSI_CRASH_SEEDS", "1"))
REPORT = os.environ.get("DLWSI_CRASH_REPORT")
#: (codec, seed) cases: mostly the fast jpeg codec, one dlwsi
LOCAL_CASES = [("jpeg", s) for s in range(SEEDS)] + [("dlwsi", 1000)]
S3_CASES = [("jpeg", 100 + s) for s in range(max(1, SEEDS - 1))]


def convert_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "ngff_convert", *map(str, args)]


def kill_at_random_point(proc: subprocess.Popen, seed: int, written, objects: int) -> dict:
    """SIGKILL ``proc`` at a seeded random point (``objects``: about how many objects a
    whole conversion stores); returns what happened."""
    rng = np.random.default_rng(seed)
    start = time.monotonic()
    if rng.random() < 0.25:  # a random time from start: imports, mask, first writes ...
        target, delay = 0, float(rng.uniform(0, 12))
    else:  # after a random number of stored objects, plus up to half a second
        target, delay = int(rng.integers(1, objects)), float(rng.uniform(0, 0.5))
    deadline = start + 300
    while proc.poll() is None and time.monotonic() < deadline and written() < target:
        time.sleep(0.03)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"seed": seed, "target_objects": target, "delay_s": round(delay, 3),
            "killed": killed, "objects_at_kill": written(),
            "seconds": round(time.monotonic() - start, 2)}


def check_killed_store(attrs: dict | None, record: dict) -> None:
    """Absent, or incomplete, or (only if the run ended by itself or was killed after its
    final write) complete with the multiscales metadata."""
    if attrs is None:
        record["state"] = "no store yet"
        return
    complete = attrs.get("ngff_convert", {}).get("complete")
    if "ome" in attrs or "multiscales" in attrs:
        assert complete is True, attrs
        record["state"] = "complete (killed after the last write)" if record["killed"] \
            else "finished before the kill"
    else:
        assert complete is False, attrs
        record["state"] = "incomplete"


def report(record: dict) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_main(capsys, monkeypatch, *args: object) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def check_verify(result: dict, codec: str) -> None:
    level0 = result["levels"][0]
    # the image, not garbage (dlwsi's default quality gives ~25.5 dB here, jpeg ~38)
    assert level0["psnr_tissue"] is not None and level0["psnr_tissue"] > 22, level0
    assert level0["ssim_tissue"] > 0.7, level0


@pytest.mark.parametrize("codec, seed", LOCAL_CASES)
def test_kill_local_then_resume(slides, tmp_path, capsys, monkeypatch, codec, seed):
    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", codec, "--workers", "1", "--no-progress"]
    if seed % 2:
        args += ["--shard", "1"]  # unsharded: many small objects; sharded: a few big ones
    proc = subprocess.Popen(convert_cmd(*args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    work = tmp_path / "out.zarr.incomplete"  # where a local store is until complete
    record = kill_at_random_point(
        proc, seed, lambda: sum(1 for p in work.rglob("*") if p.is_file()
                                and p.suffix != ".partial") if work.exists() else 0,
        objects=40 if seed % 2 else 12)
    record.update(store="local", codec=codec, shard=1 if seed % 2 else 4)
    meta = out / "zarr.json" if out.exists() else work / "zarr.json"
    attrs = json.loads(meta.read_text())["attributes"] if meta.exists() else None
    check_killed_store(attrs, record)
    if out.exists():  # only a complete store takes the target's name
        assert attrs["ngff_convert"]["complete"] is True
    if record["state"] == "incomplete":
        with pytest.raises(ConvertError, match="incomplete"):
            info(str(out))
    code, _, err = run_main(capsys, monkeypatch, *args, "--resume")
    assert code == 0, err
    assert not work.exists()
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["multiscales"] and attrs["ngff_convert"]["complete"] is True
    check_verify(verify(str(slides / CMU), str(out), Options(progress=False, workers=2)),
                 codec)
    record["resumed_and_verified"] = True
    report(record)


@pytest.mark.parametrize("codec, seed", S3_CASES)
def test_kill_s3_then_resume(slides, s3, tmp_path, codec, seed):  # noqa: F811
    env = s3_env(tmp_path)
    key = f"crash-{seed}.zarr"
    url = f"s3://{BUCKET}/{key}"
    args = [slides / CMU, url, *s3.option(), "--codec", codec, "--workers", "1",
            "--no-progress"] + (["--shard", "1"] if seed % 2 else [])
    proc = subprocess.Popen(convert_cmd(*args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    record = kill_at_random_point(proc, seed, lambda: len(s3.keys(key)),
                                  objects=40 if seed % 2 else 12)
    record.update(store="s3", codec=codec, shard=1 if seed % 2 else 4)
    attrs = (json.loads(s3.read(f"{key}/zarr.json"))["attributes"]
             if "zarr.json" in s3.keys(key) else None)
    check_killed_store(attrs, record)
    if record["state"] == "incomplete":
        proc = subprocess.run(convert_cmd("info", url, *s3.option()), capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 1 and "incomplete" in proc.stderr
    done = subprocess.run(convert_cmd(*args, "--resume"), capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    attrs = json.loads(s3.read(f"{key}/zarr.json"))["attributes"]
    assert attrs["ome"]["multiscales"] and attrs["ngff_convert"]["complete"] is True
    checked = subprocess.run(convert_cmd("verify", slides / CMU, url, *s3.option(), "--json",
                                         "--no-progress"), capture_output=True, text=True,
                             env=env)
    assert checked.returncode == 0, checked.stderr
    check_verify(json.loads(checked.stdout), codec)
    record["resumed_and_verified"] = True
    report(record)



def test_killed_while_creating_levels(slides, tmp_path, capsys, monkeypatch):
    """A kill between the group and the last level array (seen at a random kill on S3):
    --resume used to fail with ``KeyError: '2'``; it now creates the missing levels."""
    import shutil

    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", "jpeg", "--workers", "2", "--no-progress"]
    code, _, err = run_main(capsys, monkeypatch, *args)
    assert code == 0, err
    root = json.loads((out / "zarr.json").read_text())
    state = root["attributes"]["ngff_convert"]
    levels = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(levels) >= 3
    # what the killed run leaves: the progress marker only, and just the first level
    root["attributes"] = {"ngff_convert": {"complete": False, "settings": state["settings"],
                                           "version": state["version"]}}
    (out / "zarr.json").write_text(json.dumps(root))
    for name in levels[1:]:
        shutil.rmtree(out / name)
    with pytest.raises(ConvertError, match="incomplete"):
        info(str(out))
    code, _, err = run_main(capsys, monkeypatch, *args, "--resume")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == levels
    check_verify(verify(str(slides / CMU), str(out), Options(progress=False, workers=2)),
                 "jpeg")
