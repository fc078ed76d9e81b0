"""Reading converted stores remotely: a static HTTP server and an S3 server on loopback.

CMU-1-Small-Region is converted once with the defaults (dlwsi, NGFF 0.5, sharded) and
once as NGFF 0.4 (Zarr v2). The folder is then served by

- a plain static HTTP server (``http.server``, here taught single byte ranges, as every
  production web server and CDN serves them), the way most public OME-Zarr is published;
- moto's S3 server (the one s3fs itself tests against), behind a WSGI middleware that
  records every request it answers.

A fresh process that imports nothing of ours (the dlwsi codec comes in through its entry
point) opens the remote store with ``zarr.open_group(URL)`` and reads one 1024x1024
region of level 0; its pixels equal the local store's, and the servers' logs show that
only the shard indexes and the chunks the region needs were fetched, as byte ranges.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

CMU = "aperio/CMU-1-Small-Region.svs"  # level 0: 2220 x 2967
# one 1024x1024 region of level 0 (y0, y1, x0, x1): tissue and glass, across the shard
# boundaries in y and x, so it touches 4 shards (2 of them pure glass, never stored)
# and 2x3 chunks of 512
REGION = (1536, 2560, 1196, 2220)
BUCKET = "remote-read"
KEY = "testing"  # moto takes any credentials; these are not secrets
NO_CHUNK = 2**64 - 1  # shard index entry of a chunk that is not stored


# ------------------------------------------------------------------------ the stores


@pytest.fixture(scope="module")
def stores(slides, tmp_path_factory) -> Path:
    """<root>/v05.zarr (defaults: dlwsi, NGFF 0.5 sharded) and <root>/v04.zarr (Zarr v2),
    converted side by side in two processes."""
    root = tmp_path_factory.mktemp("remote")
    runs = {name: [sys.executable, "-m", "ngff_convert", str(slides / CMU), str(root / name),
                   "--workers", "1", "--no-progress", *extra]
            for name, extra in (("v05.zarr", []), ("v04.zarr", ["--ngff", "0.4"]))}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"converting {name} failed:\n{err[-3000:]}"
    return root


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def touched(region: tuple[int, int, int, int], step: int) -> list[tuple[int, int]]:
    """Grid cells (iy, ix) of side ``step`` that the region overlaps."""
    y0, y1, x0, x1 = region
    return [(iy, ix) for iy in range(y0 // step, (y1 - 1) // step + 1)
            for ix in range(x0 // step, (x1 - 1) // step + 1)]


@dataclass
class Expected:
    """What reading the region from a sharded level needs: one index per shard it
    touches (stored or not) and one byte range per stored chunk it touches."""

    shards: list[str]
    index_bytes: int
    chunks: dict[tuple[str, int], int]  # (shard key, offset) -> length
    level_chunks: int  # stored chunks in the whole level


def expected_sharded(store: Path, level: str, region: tuple[int, int, int, int]) -> Expected:
    meta = json.loads((store / level / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][1]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    chunk = sharding["configuration"]["chunk_shape"][1]
    n = shard // chunk
    index_bytes = n * n * 16 + 4  # (offset, length) uint64 per chunk, crc32c
    shards, chunks, level_chunks = [], {}, 0
    for path in (store / level / "c").rglob("*"):
        if path.is_file():
            index = np.frombuffer(path.read_bytes()[-index_bytes:-4], "<u8").reshape(-1, 2)
            level_chunks += int((index[:, 0] != NO_CHUNK).sum())
    for sy, sx in touched(region, shard):
        key = f"{level}/c/0/{sy}/{sx}"
        shards.append(key)
        path = store / key
        if not path.exists():
            continue
        index = np.frombuffer(path.read_bytes()[-index_bytes:-4], "<u8").reshape(n, n, 2)
        for cy, cx in touched(region, chunk):
            if cy * chunk // shard == sy and cx * chunk // shard == sx:
                offset, length = index[cy % n, cx % n]
                if offset != NO_CHUNK:
                    chunks[(key, int(offset))] = int(length)
    return Expected(shards, index_bytes, chunks, level_chunks)


# ------------------------------------------------------------------------- the reader


READER = textwrap.dedent("""
    import hashlib, json, sys, time
    import numpy as np
    import zarr

    url, local, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    y0, y1, x0, x1 = map(int, sys.argv[4:8])
    start = time.perf_counter()
    remote = zarr.open_group(url, mode="r", **({"storage_options": options} if options else {}))
    region = remote["0"][:, y0:y1, x0:x1]
    seconds = time.perf_counter() - start
    here = zarr.open_group(local, mode="r")["0"][:, y0:y1, x0:x1]
    print(json.dumps({
        "shape": list(region.shape), "dtype": str(region.dtype),
        "equal": bool(np.array_equal(region, here)),
        "glass": float((region == 255).all(axis=0).mean()),
        "sha256": hashlib.sha256(region.tobytes()).hexdigest(), "seconds": seconds,
        "ours_imported": sorted(m for m in sys.modules
                                if m in ("ngff_convert", "numcodecs_dlwsi")),
    }))
""")


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No proxy and no AWS settings of this machine's; loopback only."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "FSSPEC_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"), **extra)
    return env


def read_region(url: str, local: Path, env: dict[str, str], options: dict | None = None,
                region: tuple[int, int, int, int] = REGION) -> dict:
    assert "ngff_convert" not in READER.split("sys.modules")[0]
    assert "numcodecs_dlwsi" not in READER.split("sys.modules")[0]
    proc = subprocess.run([sys.executable, "-c", READER, url, str(local),
                           json.dumps(options or {}), *map(str, region)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    y0, y1, x0, x1 = region
    assert got["shape"] == [3, y1 - y0, x1 - x0] and got["dtype"] == "uint8"
    assert got["equal"], f"{url}: the region differs from the local store's"
    # the codec came in through its entry point; nothing of ours was imported by hand
    assert got["ours_imported"] == ["numcodecs_dlwsi"]
    return got


# ---------------------------------------------------------------------- HTTP server


@dataclass
class Request:
    method: str
    path: str  # relative to the served folder, no leading slash
    range: str | None
    status: int
    nbytes: int  # body bytes sent


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """``http.server`` plus single byte ranges (``bytes=a-b``, ``a-``, ``-n``, answered
    206), recording each request on ``server.log``. Several ranges in one header get the
    whole file (200), which RFC 9110 allows."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, status: int, nbytes: int) -> None:
        path = self.path.split("?", 1)[0].lstrip("/")
        self.server.log.append(Request(self.command, path, self.headers.get("Range"),
                                       status, nbytes if self.command != "HEAD" else 0))

    def send_head(self):  # noqa: ANN201
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self._record(404, 0)
            self.send_error(404, "File not found")
            return None
        size = os.path.getsize(path)
        spec = self.headers.get("Range")
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", spec or "")
        if m is None or m.groups() == ("", ""):
            self._record(200, size)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return open(path, "rb")  # the base class closes it
        first, last = m.groups()
        if first == "":  # suffix: the last n bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            self._record(416, 0)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self._record(206, len(body))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@contextlib.contextmanager
def serving(handler: type, root: Path):
    """A threaded static HTTP server on 127.0.0.1:<free port> serving ``root``."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.log = []
    server.root = root
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def http_server(stores):
    """The stores served with single byte ranges, every request recorded."""
    with serving(RangeHandler, stores) as server:
        yield server


def test_range_handler(http_server):
    """The test server itself answers ranges as a real web server does."""
    import urllib.request

    url = f"http://127.0.0.1:{http_server.server_port}/v05.zarr/zarr.json"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    whole = opener.open(url).read()
    assert whole == (http_server.root / "v05.zarr" / "zarr.json").read_bytes()
    for spec, want in (("bytes=2-9", whole[2:10]), ("bytes=-5", whole[-5:]),
                       ("bytes=10-", whole[10:])):
        with opener.open(urllib.request.Request(url, headers={"Range": spec})) as r:
            assert r.status == 206 and r.read() == want


def check_sharded_requests(data: list[Request], expected: Expected) -> None:
    """Data requests: one suffix range per touched shard (a 404 for a glass shard that
    was never stored) and byte ranges that cover exactly the touched stored chunks."""
    assert data and all(r.range for r in data), "a shard was fetched whole"
    index = [r for r in data if r.range.startswith("bytes=-")]
    assert sorted(r.path for r in index) == sorted(expected.shards)
    assert all(r.range == f"bytes=-{expected.index_bytes}" for r in index)
    assert {r.path for r in index if r.status in (200, 206)} == \
        {key for key, _ in expected.chunks}
    ranged = [r for r in data if not r.range.startswith("bytes=-")]
    assert all(r.status == 206 for r in ranged)
    # each request lies on chunk boundaries; together exactly the needed chunks
    # (a zarr that merges neighbouring chunks into one request would still pass)
    wanted = {(key, off, off + n - 1) for (key, off), n in expected.chunks.items()}
    got = set()
    for r in ranged:
        first, last = map(int, r.range.removeprefix("bytes=").split("-"))
        parts = sorted((o, e) for k, o, e in wanted if k == r.path and first <= o <= e <= last)
        assert parts and parts[0][0] == first and parts[-1][1] == last, r
        got |= {(r.path, o, e) for o, e in parts}
    assert got == wanted
    assert len(ranged) <= len(expected.chunks)
    assert sum(r.nbytes for r in ranged) == sum(expected.chunks.values())


def test_http_sharded_region(stores, http_server, tmp_path):
    """zarr.open_group("http://...") of an NGFF 0.5 store reads a 1024x1024 region with
    one suffix request per touched shard and one range per touched chunk."""
    store = stores / "v05.zarr"
    expected = expected_sharded(store, "0", REGION)
    assert len(expected.shards) == 4 and len(expected.chunks) == 4  # what REGION is for
    http_server.log.clear()
    url = f"http://127.0.0.1:{http_server.server_port}/v05.zarr"
    got = read_region(url, store, clean_env(tmp_path))
    assert 0.05 < got["glass"] < 0.95  # tissue and glass

    log = list(http_server.log)
    data = [replace(r, path=r.path.removeprefix("v05.zarr/")) for r in log
            if r.path.startswith("v05.zarr/0/c/")]
    meta = [r for r in log if not r.path.startswith("v05.zarr/0/c/")]
    check_sharded_requests(data, expected)
    # metadata: the group's and level 0's zarr.json, plus zarr probing for a v2 group
    assert all(r.path.rsplit("/", 1)[-1] in ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")
               for r in meta), meta
    assert len(meta) <= 6, meta
    # far fewer requests and bytes than the level and the store hold
    assert len(data) <= len(expected.shards) + len(expected.chunks)
    assert len(data) < expected.level_chunks
    sent = sum(r.nbytes for r in log)
    total = store_bytes(store)
    level0 = store_bytes(store / "0")
    assert sent < 0.3 * total and sent < 0.4 * level0, (sent, total, level0)


def test_http_zarr_v2_region(stores, http_server, tmp_path):
    """An NGFF 0.4 (Zarr v2) store over HTTP: one GET per touched chunk object, a 404
    (read as glass, fill value 255) for chunks never stored; same pixels as NGFF 0.5."""
    store = stores / "v04.zarr"
    http_server.log.clear()
    got = read_region(f"http://127.0.0.1:{http_server.server_port}/v04.zarr", store,
                      clean_env(tmp_path))
    log = list(http_server.log)
    keys = {f"v04.zarr/0/0/{cy}/{cx}" for cy, cx in touched(REGION, 512)}
    data = [r for r in log if r.path.startswith("v04.zarr/0/0/")]
    assert sorted(r.path for r in data) == sorted(keys)  # each once, nothing else
    assert all(r.range is None for r in data)
    stored = {k for k in keys if (stores / k).exists()}
    assert stored and stored != keys  # some tissue chunks, some glass chunks
    assert {r.path for r in data if r.status == 200} == stored
    assert sum(r.nbytes for r in data) == sum((stores / k).stat().st_size for k in stored)
    assert len(log) - len(data) <= 8, log  # metadata
    # the same codec on the same 512x512 chunks: the same pixels as the sharded store
    import hashlib

    import zarr

    y0, y1, x0, x1 = REGION
    v05 = zarr.open_group(stores / "v05.zarr", mode="r")["0"][:, y0:y1, x0:x1]
    assert got["sha256"] == hashlib.sha256(v05.tobytes()).hexdigest()


# ------------------------------------------------------------------------ S3 server


class CountingApp:
    """WSGI middleware: records method, path, query, Range, status and body bytes of
    every request the wrapped application answers."""

    def __init__(self, app) -> None:
        self.app = app
        self.log: list[Request] = []

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "").lstrip("/")
        query = environ.get("QUERY_STRING")
        # logged before it is answered, counted while it is: complete once the client
        # has the response, whatever the server thread does next
        request = Request(method, f"{path}?{query}" if query else path,
                          environ.get("HTTP_RANGE"), 0, 0)
        self.log.append(request)

        def start(code, headers, exc_info=None):
            request.status = int(code.split()[0])
            return start_response(code, headers, exc_info)

        return self._count(request, self.app(environ, start))

    def _count(self, request, body):
        try:
            for part in body:
                if request.method != "HEAD":
                    request.nbytes += len(part)
                yield part
        finally:
            if hasattr(body, "close"):
                body.close()


@pytest.fixture(scope="module")
def s3_server(stores):
    """moto's S3 application on 127.0.0.1:<free port> (what ThreadedMotoServer runs),
    every request counted; the converted stores uploaded to a bucket."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3")
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = CountingApp(moto_server.DomainDispatcherApplication(moto_server.create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         request_handler=moto_server.MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=KEY, aws_secret_access_key=KEY)
        client.create_bucket(Bucket=BUCKET)
        for path in stores.rglob("*"):
            if path.is_file():
                client.put_object(Bucket=BUCKET, Key=path.relative_to(stores).as_posix(),
                                  Body=path.read_bytes())
        yield endpoint, app
    finally:
        server.shutdown()
        thread.join()


def test_s3_sharded_region(stores, s3_server, tmp_path):
    """zarr.open_group("s3://...", storage_options={"endpoint_url": ...}) with the
    credentials in the environment: same pixels, same data requests as over HTTP."""
    endpoint, app = s3_server
    store = stores / "v05.zarr"
    expected = expected_sharded(store, "0", REGION)
    app.log.clear()
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY,
                    AWS_DEFAULT_REGION="us-east-1")
    read_region(f"s3://{BUCKET}/v05.zarr", store, env, {"endpoint_url": endpoint})
    log = list(app.log)
    prefix = f"{BUCKET}/v05.zarr/"
    data = [replace(r, path=r.path.removeprefix(prefix)) for r in log
            if r.path.startswith(f"{prefix}0/c/")]
    meta = [r for r in log if not r.path.startswith(f"{prefix}0/c/")]
    assert all(r.method == "GET" for r in data), data
    check_sharded_requests(data, expected)
    # metadata: HEAD/GET of zarr.json, probes for a v2 group (HEAD and a listing each)
    assert len(meta) <= 12, meta
    assert sum(r.nbytes for r in log) < 0.3 * store_bytes(store)


# ------------------------------------------------- a static server without byte ranges


@pytest.fixture(scope="module")
def plain_http_server(stores):
    """Python's own ``http.server``, which ignores the Range header (sends whole files)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(Quiet, stores) as server:
        yield server


def test_server_without_ranges_is_named(stores, plain_http_server, tmp_path):
    """A sharded store on a server that ignores byte ranges: one line naming the cause and
    the fixes, instead of zarr's checksum mismatch; an unsharded (NGFF 0.4) store reads
    from the same server, and ``check`` decodes every chunk of it over HTTP."""
    base = f"http://127.0.0.1:{plain_http_server.server_port}"
    env = clean_env(tmp_path)
    for command in ("info", "check"):
        proc = subprocess.run([sys.executable, "-m", "ngff_convert", command,
                               f"{base}/v05.zarr"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "ignores HTTP byte ranges" in line and "--ngff 0.4" in line, line
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", "check", f"{base}/v04.zarr",
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no damage found" in proc.stdout
