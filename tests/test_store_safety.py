"""What ngff-convert may destroy, where damage is, what leaves the hospital.

- ``--overwrite`` replaces only a store the converter wrote and that holds nothing else:
  a folder holding the input slide, a folder of other files, a store with a stray file
  are refused with one line and left exactly as they were; a replacement that dies
  leaves the old store intact.
- An interrupted conversion says truthfully what can be resumed.
- ``ngff-convert check`` decodes every stored chunk and names each damaged one by level,
  chunk index and object; ``verify`` goes on past damage and reports it.
- By default a store keeps no file name and no identifying slide property.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ngff_helpers import assert_one_line_error, kill_once_written

CMU = "aperio/CMU-1-Small-Region.svs"
SMALL = "dicom/highdicom_sm_image/sm_image.dcm"  # a tiny valid slide: fast conversions
NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that is not stored
IDENTIFYING = ("aperio.Filename", "aperio.User", "aperio.Date", "aperio.Time",
               "aperio.ScanScope ID", "tiff.ImageDescription", "openslide.comment")


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ngff_convert", *map(str, args)]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=600)


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cmu_jpeg(slides, tmp_path_factory) -> Path:
    """CMU-1 converted with the JPEG codec (fast), sharded: a store to damage."""
    out = tmp_path_factory.mktemp("safety") / "cmu.zarr"
    proc = run_cli(slides / CMU, out, "--codec", "jpeg", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out


# ------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_a_folder_holding_the_input(slides, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides / SMALL, folder / "slide.dcm")
    before = tree(folder)
    proc = run_cli(folder / "slide.dcm", folder, "--codec", "jpeg", "--overwrite",
                   "--no-progress")
    assert_one_line_error(proc, "holds the input", "refusing")
    assert tree(folder) == before  # the slide is still there, unchanged
    assert not (tmp_path / "slides.incomplete").exists()


def test_overwrite_refuses_a_folder_of_other_files(slides, tmp_path):
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("not ours")
    (folder / "sub" / "table.csv").write_text("1,2\n")
    before = tree(folder)
    proc = run_cli(slides / SMALL, folder, "--codec", "jpeg", "--overwrite", "--no-progress")
    assert_one_line_error(proc, "not a store written by ngff-convert", "refusing")
    assert tree(folder) == before


def test_overwrite_refuses_a_store_holding_other_files(slides, tmp_path):
    out = tmp_path / "out.zarr"
    assert run_cli(slides / SMALL, out, "--codec", "jpeg", "--no-progress").returncode == 0
    (out / "my-annotations.geojson").write_text("{}")
    before = tree(out)
    proc = run_cli(slides / SMALL, out, "--codec", "jpeg", "--overwrite", "--no-progress")
    assert_one_line_error(proc, "did not write", "my-annotations.geojson")
    assert tree(out) == before


def test_overwrite_refuses_a_file(slides, tmp_path):
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF-1.4 not ours")
    proc = run_cli(slides / SMALL, target, "--codec", "jpeg", "--overwrite", "--no-progress")
    assert_one_line_error(proc, "is a file", "refusing")
    assert target.read_bytes() == b"%PDF-1.4 not ours"


def test_failed_overwrite_leaves_the_old_store(slides, tmp_path):
    """The replacement is written beside the old store and renamed into place only when
    complete: killed half-way, the old store is still there, whole and readable."""
    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", "jpeg", "--shard", "1", "--workers", "1",
            "--no-progress"]
    assert run_cli(*args).returncode == 0
    before = tree(out)
    proc = subprocess.Popen(cli(*args, "--overwrite", "--quality", "50"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = tmp_path / "out.zarr.incomplete"
    kill_once_written(proc, lambda: sum(p.is_file() for p in (work / "0").rglob("*"))
                      if (work / "0").exists() else 0)
    assert tree(out) == before
    assert run_cli("info", out).returncode == 0
    # the killed replacement waits in the sibling; a plain re-run says so
    assert_one_line_error(run_cli(*args, "--quality", "50"), "interrupted conversion",
                          "--resume")
    # --overwrite proves both are ours, then replaces the old store and the sibling
    done = run_cli(*args, "--overwrite", "--quality", "50")
    assert done.returncode == 0, done.stderr
    assert not work.exists() and tree(out) != before
    assert not [p for p in tmp_path.iterdir() if p.name not in ("out.zarr",)]


def sigint_after(proc: subprocess.Popen, ready) -> str:
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_interrupt_before_writing_says_nothing_to_resume(slides, tmp_path):
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen(cli(slides / CMU, out, "--no-progress"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # dlwsi's default first chooses the quality (about 20 s here): interrupted while it
    # does, nothing is written
    time.sleep(6)
    line = sigint_after(proc, lambda: True)
    assert line == "ngff-convert: interrupted before anything was written; nothing to resume"
    assert list(tmp_path.iterdir()) == []


def test_interrupt_after_writing_says_resume(slides, tmp_path):
    out = tmp_path / "out.zarr"
    args = [slides / CMU, out, "--codec", "jpeg", "--shard", "1", "--workers", "1",
            "--quality", "95", "--no-progress"]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    work = tmp_path / "out.zarr.incomplete"
    line = sigint_after(proc, lambda: (work / "0" / "c").exists())
    assert "is incomplete" in line and "--resume" in line and str(work) in line
    assert not out.exists()
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert "found" in done.stderr and "remain" in done.stderr  # what it resumed
    assert out.exists() and not work.exists()


# ------------------------------------------------------------------------------ damage


def chunk_span(shard: Path, chunks_per_side: int, row: int, col: int) -> tuple[int, int]:
    """(offset, length) of a chunk in a sharded object, from its index."""
    index_bytes = chunks_per_side**2 * 16 + 4
    index = np.frombuffer(shard.read_bytes()[-index_bytes:-4], "<u8").reshape(
        chunks_per_side, chunks_per_side, 2)
    offset, length = index[row, col]
    assert offset != NO_CHUNK
    return int(offset), int(length)


def flip(path: Path, at: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_check_locates_damaged_chunks(slides, cmu_jpeg, tmp_path):
    store = tmp_path / "damaged.zarr"
    shutil.copytree(cmu_jpeg, store)
    clean = run_cli("check", cmu_jpeg, "--no-progress")
    assert clean.returncode == 0 and "no damage found" in clean.stdout
    # one chunk's bytes (level 0, chunk row 1, column 2, in shard 0/c/0/0/0) and one
    # shard's index (level 2: every chunk in it becomes unreadable)
    shard = store / "0" / "c" / "0" / "0" / "0"
    offset, length = chunk_span(shard, 4, 1, 2)
    flip(shard, offset + length // 2)
    level2 = store / "2" / "c" / "0" / "0" / "0"
    flip(level2, level2.stat().st_size - 12, 4)
    proc = run_cli("check", store, "--json", "--no-progress", "--workers", "2")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    found = {(d["level"], tuple(d["chunk"]), d["key"]) for d in report["damaged"]}
    assert ("0", (1, 2), "0/c/0/0/0") in found
    assert {d for d in found if d[0] == "0"} == {("0", (1, 2), "0/c/0/0/0")}
    level2_chunks = [d for d in found if d[0] == "2"]
    assert level2_chunks and all(d[2] == "2/c/0/0/0" for d in level2_chunks)
    assert all(d["error"] for d in report["damaged"])
    text = run_cli("check", store, "--no-progress")
    assert "damaged: level 0, chunk 1,2 (object 0/c/0/0/0)" in text.stdout
    # verify goes on past the damage and reports it, leaving those pixels out
    verify = run_cli("verify", slides / CMU, store, "--json", "--no-progress")
    assert verify.returncode == 1
    result = json.loads(verify.stdout)
    assert {(d["level"], tuple(d["chunk"])) for d in result["damaged"]} == \
        {(d[0], d[1]) for d in found}
    level0 = result["levels"][0]
    assert level0["damaged_chunks"] == 1 and level0["ssim_tissue"] > 0.9


def test_dlwsi_chunk_damage_is_located(slides, tmp_path):
    """A dlwsi chunk's own CRC catches a flipped byte; check names the chunk."""
    store = tmp_path / "dlwsi.zarr"
    proc = run_cli(slides / CMU, store, "--quality", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    shard = store / "0" / "c" / "0" / "0" / "0"
    offset, length = chunk_span(shard, 4, 2, 1)
    flip(shard, offset + length - 20)
    check = run_cli("check", store, "--json", "--no-progress")
    assert check.returncode == 1
    damaged = json.loads(check.stdout)["damaged"]
    assert [(d["level"], d["chunk"], d["key"]) for d in damaged] == \
        [("0", [2, 1], "0/c/0/0/0")]
    assert "corrupt" in damaged[0]["error"]


def test_classical_codecs_carry_a_checksum(cmu_jpeg):
    meta = json.loads((cmu_jpeg / "0" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert inner[-1] == {"name": "crc32c"}


def test_check_bad_input(tmp_path):
    assert_one_line_error(run_cli("check", tmp_path / "nothing.zarr"), "no such store")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    assert_one_line_error(run_cli("check", tmp_path / "plain"), "not a Zarr group")


# ----------------------------------------------------------------------------- privacy


def all_metadata(store: Path) -> str:
    return "\n".join(p.read_text() for p in store.rglob("*")
                     if p.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"))


def test_no_identifying_metadata_by_default(slides, cmu_jpeg):
    attrs = json.loads((cmu_jpeg / "zarr.json").read_text())["attributes"]
    props = attrs["openslide"]
    for key in IDENTIFYING:
        assert key not in props
    assert props["openslide.vendor"] == "aperio" and props["openslide.mpp-x"]
    assert all(k.startswith("openslide.") for k in props)
    text = all_metadata(cmu_jpeg)
    for word in ("CMU-1", ".svs", "Filename", "ImageDescription"):
        assert word not in text, word
    settings = attrs["ngff_convert"]["settings"]
    digest = hashlib.sha256((slides / CMU).read_bytes()).hexdigest()
    assert settings["source_sha256"] == digest
    assert attrs["ome"]["multiscales"][0]["name"] == "image"
    assert not (cmu_jpeg / "associated").exists()


def test_keep_properties_on_request(slides, tmp_path):
    out = tmp_path / "kept.zarr"
    proc = run_cli(slides / CMU, out, "--codec", "jpeg", "--keep-properties", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["openslide"]["aperio.Filename"] and "aperio.Date" in attrs["openslide"]
    assert attrs["ome"]["multiscales"][0]["name"] == "CMU-1-Small-Region.svs"


def test_files_put_in_the_target_meanwhile_are_not_replaced(slides, tmp_path):
    """Something else writes into the target while the conversion runs: the finished
    store is not renamed over it; it waits, complete, beside the target."""
    from ngff_convert import ConvertError
    from ngff_convert.convert import convert
    from ngff_convert.options import Options

    out = tmp_path / "out.zarr"

    def log(message: str) -> None:  # the first log line comes before anything is written
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("not ours")

    with pytest.raises(ConvertError, match="refusing to replace it"):
        convert(str(slides / SMALL), str(out), Options(codec="jpeg", progress=False), log=log)
    assert (out / "notes.txt").read_text() == "not ours"
    work = json.loads((tmp_path / "out.zarr.incomplete" / "zarr.json").read_text())
    assert work["attributes"]["ngff_convert"]["complete"] is True
