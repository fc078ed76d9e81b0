"""ngff-convert against a real S3-compatible server on loopback (moto's server).

The server runs in this process on 127.0.0.1 and a free port; every conversion, ``info``
and ``verify`` runs the command in its own process, pointed at the server with
``--storage-option endpoint_url=...`` (or the AWS_ENDPOINT_URL* variables), and the
result is read back by a fresh process with nothing but ``zarr`` and s3fs: the dlwsi
codec must come in through its entry point, as for any user.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ngff_helpers import assert_one_line_error, kill_once_written

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
CMU = "aperio/CMU-1-Small-Region.svs"
BUCKET = "slides"
KEY = "testing"  # moto takes any credentials; these are not secrets



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    def __init__(self, endpoint: str, client) -> None:
        self.endpoint = endpoint
        self.client = client

    def option(self) -> list[str]:
        return ["--storage-option", f"endpoint_url={self.endpoint}"]

    def keys(self, prefix: str, bucket: str = BUCKET) -> dict[str, dict]:
        """Every object under ``prefix`` (relative key -> listing entry)."""
        found = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix.rstrip("/")) + 1:]] = obj
        return found

    def read(self, key: str, bucket: str = BUCKET) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def s3() -> S3:
    """moto's S3 server on 127.0.0.1:<free port> with an empty bucket; stopped at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (test extra)")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=KEY, aws_secret_access_key=KEY)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield S3(endpoint, client)
    finally:
        server.stop()


def s3_env(tmp_path: Path, credentials: bool = True, **extra: str) -> dict[str, str]:
    """This environment without any AWS settings of the machine's, plus test credentials.

    Instance metadata is off (a missing credential must never send a request off this
    machine) and loopback bypasses any proxy.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "FSSPEC_S3")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if credentials:
        env.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY)
    env.update(extra)
    return env


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ngff_convert", *map(str, args)]


def run_cli(env: dict[str, str], *args: object, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ngff-convert {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------ convert, read, info, verify


@pytest.fixture(scope="module")
def converted(slides, s3, tmp_path_factory) -> dict:
    """CMU-1-Small-Region converted with the defaults (dlwsi, NGFF 0.5, glass fill) to
    a local folder and to s3://slides/cmu.zarr, the same settings."""
    tmp = tmp_path_factory.mktemp("s3")
    env = s3_env(tmp)
    local = tmp / "cmu.zarr"
    run_cli(env, slides / CMU, local, "--workers", "1", "--no-progress")
    url = f"s3://{BUCKET}/cmu.zarr"
    proc = run_cli(env, slides / CMU, url, *s3.option(), "--workers", "1", "--no-progress")
    return {"env": env, "local": local, "url": url, "key": "cmu.zarr", "stdout": proc.stdout,
            "tmp": tmp}


READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import zarr

    url, endpoint, local = sys.argv[1:]
    remote = zarr.open_group(url, mode="r", storage_options={"endpoint_url": endpoint})
    here = zarr.open_group(local, mode="r")
    ms = remote.attrs["ome"]["multiscales"][0]
    levels = []
    for d in ms["datasets"]:
        a, b = remote[d["path"]], here[d["path"]]
        pa, pb = a[...], b[...]
        glass = []  # level 0: which shards read as pure glass (255 everywhere)
        if d["path"] == "0":
            sy, sx = a.shards[1:]
            for iy in range(-(-a.shape[1] // sy)):
                for ix in range(-(-a.shape[2] // sx)):
                    if (pa[:, iy * sy:(iy + 1) * sy, ix * sx:(ix + 1) * sx] == 255).all():
                        glass.append(f"0/c/0/{iy}/{ix}")
        levels.append({"path": d["path"], "shape": list(a.shape), "local_shape": list(b.shape),
                       "equal": bool(np.array_equal(pa, pb)), "dtype": str(pa.dtype),
                       "mean": float(pa.mean()), "glass_shards": glass})
    print(json.dumps({
        "levels": levels,
        "complete": remote.attrs["ngff_convert"]["complete"],
        "codecs": [c["name"] for c in remote["0"].metadata.to_dict()["codecs"][0][
            "configuration"]["codecs"]],
        "ours_imported": sorted(m for m in sys.modules
                                if m.split(".")[0] in ("ngff_convert", "numcodecs_dlwsi")
                                and m.count(".") == 0),
    }))
""")


def test_read_back_with_plain_zarr_equals_local(converted, s3):
    """A fresh process opens the S3 store with zarr.open_group("s3://...") alone and
    gets every level's shape and pixels identical to the local conversion."""
    assert converted["stdout"].startswith(f"{converted['url']}: 4 levels")
    assert "import ngff_convert" not in READER and "numcodecs_dlwsi" not in \
        READER.split("sys.modules")[0]
    proc = subprocess.run([sys.executable, "-c", READER, converted["url"], s3.endpoint,
                           str(converted["local"])], capture_output=True, text=True,
                          timeout=600, env=converted["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["complete"] is True
    # CMU-1 is JPEG: level 0 reads through the lattice filter, then dlwsi
    assert got["codecs"] == ["dlwsi_jpeg_lattice", "dlwsi"]
    # the codec came in through its entry point, nothing of ours was imported by hand
    assert got["ours_imported"] == ["numcodecs_dlwsi"]
    shapes = [lv["shape"] for lv in got["levels"]]
    assert shapes == [[3, 2967, 2220], [3, 1484, 1110], [3, 742, 555], [3, 371, 278]]
    for lv in got["levels"]:
        assert lv["shape"] == lv["local_shape"], lv
        assert lv["equal"], f"level {lv['path']} differs from the local conversion"
        assert lv["dtype"] == "uint8" and 0 < lv["mean"] < 255
    # the level-0 shards with no object in the bucket are exactly those that read as
    # pure glass (fill value 255), and there are some
    grid = {f"0/c/0/{iy}/{ix}" for iy in range(math.ceil(2967 / 2048))
            for ix in range(math.ceil(2220 / 2048))}
    absent = grid - set(s3.keys(converted["key"]))
    assert absent and absent == set(got["levels"][0]["glass_shards"])


def test_objects_equal_local_and_glass_shards_absent(converted, s3):
    """Same codec, same settings: the bucket holds exactly the local files, byte for
    byte, and no object for the level-0 shards without tissue."""
    objects = s3.keys(converted["key"])
    files = local_files(converted["local"])
    assert sorted(objects) == sorted(files)
    for key, data in files.items():
        assert s3.read(f"{converted['key']}/{key}") == data, key
    assert ".ngff-convert-probe" not in objects
    # level 0 is 2x2 shards of 2048 pixels; CMU's tissue leaves whole shards of glass
    level0 = {k for k in objects if k.startswith("0/c/")}
    grid = {f"0/c/0/{iy}/{ix}" for iy in range(math.ceil(2967 / 2048))
            for ix in range(math.ceil(2220 / 2048))}
    assert level0 and level0 < grid  # some stored, some glass-only shards absent


def test_info_on_s3(converted, s3, tmp_path):
    env = converted["env"]
    remote = json.loads(run_cli(env, "info", converted["url"], *s3.option(), "--json").stdout)
    local = json.loads(run_cli(env, "info", converted["local"], "--json").stdout)
    assert remote["store"] == converted["url"]
    assert [lv["shape"] for lv in remote["levels"]] == [lv["shape"] for lv in local["levels"]]
    assert remote["stored_bytes"] == local["stored_bytes"]
    assert remote["objects"] == local["objects"]
    assert [lv["objects"] for lv in remote["levels"]] == \
        [lv["objects"] for lv in local["levels"]]
    text = run_cli(env, "info", converted["url"], *s3.option()).stdout
    assert text.startswith(f"{converted['url']}: OME-NGFF 0.5 (Zarr v3)")


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_from_environment(converted, s3, tmp_path, variable):
    """botocore's endpoint variables work without any --storage-option."""
    env = s3_env(tmp_path, **{variable: s3.endpoint})
    d = json.loads(run_cli(env, "info", converted["url"], "--json").stdout)
    assert len(d["levels"]) == 4


def test_verify_on_s3(converted, s3, slides):
    proc = run_cli(converted["env"], "verify", slides / CMU, converted["url"], *s3.option(),
                   "--json", "--workers", "1", "--no-progress")
    d = json.loads(proc.stdout)
    assert d["store"] == converted["url"]
    assert [lv["shape"] for lv in d["levels"]] == \
        [[3, 2967, 2220], [3, 1484, 1110], [3, 742, 555], [3, 371, 278]]
    for lv in d["levels"]:
        assert math.isfinite(lv["psnr_all"]) and lv["psnr_all"] > 10
        assert lv["stored_bytes"] > 0


def test_existing_store_needs_overwrite(converted, s3, slides):
    env = converted["env"]
    proc = run_cli(env, slides / CMU, converted["url"], *s3.option(), "--no-progress",
                   check=False)
    assert_one_line_error(proc, "already exists", "--overwrite")
    # --overwrite replaces a store of ours (jpeg: quick)
    url = f"s3://{BUCKET}/overwrite.zarr"
    run_cli(env, slides / CMU, url, *s3.option(), "--codec", "jpeg", "--quality", "50",
            "--no-progress")
    proc = run_cli(env, slides / CMU, url, *s3.option(), "--codec", "jpeg", "--no-progress",
                   "--overwrite")
    keys = s3.keys("overwrite.zarr")
    assert f"in {len(keys)} objects" in proc.stdout  # the summary counts what is there
    level0 = json.loads(s3.client.get_object(Bucket=BUCKET, Key="overwrite.zarr/0/zarr.json")
                        ["Body"].read())
    assert '"level": 90' in json.dumps(level0)  # the new store, not the old one
    # ... but never a prefix that holds anything else, nor a bucket's root
    s3.client.put_object(Bucket=BUCKET, Key="overwrite.zarr/stray", Body=b"x")
    before = s3.keys("overwrite.zarr")
    proc = run_cli(env, slides / CMU, url, *s3.option(), "--codec", "jpeg", "--no-progress",
                   "--overwrite", check=False)
    assert_one_line_error(proc, "did not write", "stray")
    assert s3.keys("overwrite.zarr") == before
    def everything() -> list[str]:
        listing = s3.client.list_objects_v2(Bucket=BUCKET)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    objects = everything()
    proc = run_cli(env, slides / CMU, f"s3://{BUCKET}", *s3.option(), "--codec", "jpeg",
                   "--no-progress", "--overwrite", check=False)
    assert_one_line_error(proc, "bucket's root")
    assert objects and everything() == objects


# ---------------------------------------------------------------------------- resume


def test_resume_on_s3(slides, s3, tmp_path):
    """Killed mid-way, the S3 store is incomplete; --resume finishes it and rewrites no
    object of the first run (the bucket keeps versions: one version per key)."""
    bucket = "resume"
    s3.client.create_bucket(Bucket=bucket)
    s3.client.put_bucket_versioning(Bucket=bucket,
                                    VersioningConfiguration={"Status": "Enabled"})
    env = s3_env(tmp_path)
    url = f"s3://{bucket}/cmu.zarr"
    args = [slides / CMU, url, *s3.option(), "--codec", "jpeg", "--shard", "1",
            "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    kill_once_written(proc, lambda: sum(k.startswith("0/c/")
                                        for k in s3.keys("cmu.zarr", bucket)))
    first = s3.keys("cmu.zarr", bucket)
    assert any(k.startswith("0/c/") for k in first)
    attrs = json.loads(s3.read("cmu.zarr/zarr.json", bucket))["attributes"]
    assert "ome" not in attrs and attrs["ngff_convert"]["complete"] is False
    info = run_cli(env, "info", url, *s3.option(), check=False)
    assert_one_line_error(info, "incomplete")
    again = run_cli(env, *args, check=False)
    assert_one_line_error(again, "--resume")

    done = run_cli(env, *args, "--resume")
    assert "already done" in done.stdout
    versions = {}
    for page in s3.client.get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix="cmu.zarr/"):
        for v in page.get("Versions", []):
            versions.setdefault(v["Key"], []).append(v["VersionId"])
    for key in first:
        if key.startswith(("0/c/", "1/c/", "2/c/", "3/c/")):
            assert len(versions[f"cmu.zarr/{key}"]) == 1, f"{key} was written again"
    attrs = json.loads(s3.read("cmu.zarr/zarr.json", bucket))["attributes"]
    assert attrs["ome"]["multiscales"] and attrs["ngff_convert"]["complete"] is True
    # equal to an uninterrupted conversion
    fresh = tmp_path / "fresh.zarr"
    run_cli(env, slides / CMU, fresh, "--codec", "jpeg", "--shard", "1", "--no-progress")
    resumed = s3.keys("cmu.zarr", bucket)
    whole = local_files(fresh)
    assert sorted(resumed) == sorted(whole)
    for key, data in whole.items():
        if "/c/" in key:
            assert s3.read(f"cmu.zarr/{key}", bucket) == data, key
    noop = run_cli(env, *args, "--resume")
    assert "already complete" in noop.stderr


# ------------------------------------------------------------------------ bad input


def timed(env: dict[str, str], *args: object) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_cli(env, *args, check=False, timeout=120)
    return proc, time.monotonic() - start


def test_missing_bucket(slides, s3, tmp_path):
    env = s3_env(tmp_path)
    proc, _ = timed(env, slides / CMU, "s3://no-such-bucket/out.zarr", *s3.option(),
                    "--no-progress")
    assert_one_line_error(proc, "bucket 'no-such-bucket' does not exist", s3.endpoint)
    # and it was not created on the way
    assert "no-such-bucket" not in {b["Name"] for b in s3.client.list_buckets()["Buckets"]}
    proc, _ = timed(env, "info", "s3://no-such-bucket/out.zarr", *s3.option())
    assert_one_line_error(proc, "does not exist")


def test_no_credentials(slides, s3, tmp_path):
    env = s3_env(tmp_path, credentials=False)
    proc, seconds = timed(env, slides / CMU, f"s3://{BUCKET}/nocred.zarr", *s3.option(),
                          "--no-progress")
    assert_one_line_error(proc, "no S3 credentials", "AWS_ACCESS_KEY_ID")
    assert seconds < 60
    assert not s3.keys("nocred.zarr")


def test_closed_port_fails_fast(slides, s3, tmp_path):
    env = s3_env(tmp_path)
    port = free_port()  # nothing listens there
    proc, seconds = timed(env, slides / CMU, f"s3://{BUCKET}/closed.zarr", "--storage-option",
                          f"endpoint_url=http://127.0.0.1:{port}", "--no-progress")
    assert_one_line_error(proc, "cannot reach the S3 endpoint", f"127.0.0.1:{port}")
    assert seconds < 30


def test_silent_endpoint_times_out(s3, tmp_path):
    """A server that accepts connections and never answers: short timeouts, no hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes handshakes; nobody ever reads
        port = silent.getsockname()[1]
        proc, seconds = timed(s3_env(tmp_path), "info", f"s3://{BUCKET}/x.zarr",
                              "--storage-option", f"endpoint_url=http://127.0.0.1:{port}")
    assert_one_line_error(proc, "cannot reach the S3 endpoint", "timeout")
    assert seconds < 30


@pytest.mark.parametrize(("option", "words"), [
    ("endpoint_url", ["must be KEY=VALUE"]),
    ("=http://x", ["must be KEY=VALUE"]),
    ("endpoint_url=", ["no value"]),
    ("endpont_url=http://127.0.0.1:1", ["not an option of s3", "did you mean endpoint_url"]),
    ("client_kwargs={bad json", ["not valid JSON"]),
])
def test_malformed_storage_option(slides, tmp_path, option, words):
    env = s3_env(tmp_path)
    proc, seconds = timed(env, slides / CMU, f"s3://{BUCKET}/bad.zarr", "--storage-option",
                          option, "--no-progress")
    assert_one_line_error(proc, *words)
    proc, _ = timed(env, "info", f"s3://{BUCKET}/bad.zarr", "--storage-option", option)
    assert_one_line_error(proc, *words)


def test_storage_option_on_local_path_is_refused(slides, tmp_path):
    proc, _ = timed(s3_env(tmp_path), slides / CMU, tmp_path / "out.zarr",
                    "--storage-option", "anon=true", "--no-progress")
    assert_one_line_error(proc, "applies to URLs")
    assert not (tmp_path / "out.zarr").exists()


def test_parse_storage_options():
    from ngff_convert import ConvertError
    from ngff_convert.store import parse_storage_options

    got = parse_storage_options([
        "endpoint_url=http://127.0.0.1:9000", "anon=false", "use_ssl=TRUE",
        "max_concurrency=4", "listings_expiry_time=1.5", "max_paths=none",
        "client_kwargs.region_name=eu-west-1", "config_kwargs={\"connect_timeout\": 3}",
        "key=0123", "secret=a=b", "profile=12",
    ])
    assert got == {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "use_ssl": True,
                   "max_concurrency": 4, "listings_expiry_time": 1.5, "max_paths": None,
                   "client_kwargs": {"region_name": "eu-west-1"},
                   "config_kwargs": {"connect_timeout": 3}, "key": "0123",
                   "secret": "a=b", "profile": "12"}
    with pytest.raises(ConvertError, match="already set"):
        parse_storage_options(["client_kwargs=1", "client_kwargs.region_name=x"])
