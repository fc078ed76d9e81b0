"""ngff-convert --scheduler on a dask.distributed cluster of several worker processes.

A ``LocalCluster`` (two worker processes, one thread each) converts a real slide with
the default settings (dlwsi, NGFF 0.5, glass fill) through ``--scheduler ADDRESS``; a
second conversion runs in one process with dask's local threads. Every object of the
two stores, metadata included, must be byte-for-byte the same.

The workers are started in a scratch folder of their own and the command is given a
relative output path, as on a real cluster where the workers' working directory is not
the client's: the shards must still land in the client's store.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

CMU = "aperio/CMU-1-Small-Region.svs"
WORKERS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    distributed = pytest.importorskip("distributed")
    scratch = tmp_path_factory.mktemp("workers-cwd")
    here = os.getcwd()
    os.chdir(scratch)  # the worker processes inherit it
    try:
        cluster = distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=logging.ERROR,
            env={"DLWSI_THREADS": "1"})  # one core per worker for onnxruntime too
    finally:
        os.chdir(here)
    try:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(WORKERS, timeout=120)
            yield cluster, client, scratch
    finally:
        cluster.close()


def start_cli(*args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ngff_convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"ngff-convert failed:\n{err[-3000:]}"
    return out


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cluster_conversion_equals_single_process(cluster, slides, tmp_path):
    cluster, client, scratch = cluster
    before = client.run(lambda dask_worker: dask_worker.state.executed_count)
    # the single-process conversion runs meanwhile, in its own process
    single = start_cli(slides / CMU, tmp_path / "single.zarr", "--workers", "2",
                       "--no-progress")
    out = finish(start_cli(slides / CMU, "cluster.zarr", "--scheduler",
                           cluster.scheduler_address, "--no-progress", cwd=tmp_path))
    assert out.startswith("cluster.zarr: 4 levels"), out
    after = client.run(lambda dask_worker: dask_worker.state.executed_count)
    # the work ran on the cluster, spread over its worker processes
    done = {w: after[w] - before.get(w, 0) for w in after}
    assert len(done) == WORKERS and all(n > 0 for n in done.values()), done
    assert not any(scratch.rglob("*.zarr")), "a worker wrote relative to its own cwd"

    finish(single)
    distributed_files = files(tmp_path / "cluster.zarr")
    single_files = files(tmp_path / "single.zarr")
    assert sorted(distributed_files) == sorted(single_files)
    shards = [k for k in single_files if "/c/" in k]
    assert len(shards) >= 4  # every level has stored shards
    different = [k for k in single_files if distributed_files[k] != single_files[k]]
    assert not different, f"objects differ between the two conversions: {different}"
