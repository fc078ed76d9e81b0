"""Time to read one 1024x1024 region of level 0: local store vs HTTP vs S3, on loopback.

The same NGFF 0.5 store (CMU-1-Small-Region converted with the defaults: dlwsi, 512-pixel
chunks in 2048-pixel shards) is read

- from its local folder (``zarr.open_group(path)``);
- over HTTP from a static file server on 127.0.0.1 (``http.server`` with single byte
  ranges, as any web server or CDN answers them): ``zarr.open_group("http://...")``;
- over S3 from moto's S3 server on 127.0.0.1 (the server s3fs tests against):
  ``zarr.open_group("s3://...", storage_options={"endpoint_url": ...})``.

For each, the group and level 0 are opened (timed as "open") and the region is read
``--repeat`` times (a fresh read each time: zarr keeps no chunk cache); the servers count
the requests and body bytes of each read. ``--latency-ms`` adds a delay before every
answer of both servers, to show what round trips cost where the store is really remote
(loopback has none). Reads run with zarr's ``codec_pipeline.batch_size`` 1 (zarr's
default) and 16 (dlwsi decodes the chunks of a batch in one call).

Example::

    python benchmarks/remote_read.py --json docs/results/remote_read.json
    python benchmarks/remote_read.py --store out.zarr --region 0,1024,0,1024 --repeat 10
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import io
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr
from report import provenance, publish, table

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "slides" / "aperio" / "CMU-1-Small-Region.svs"
# (name, (y0, y1, x0, x1)) on CMU-1-Small-Region's level 0 (2967 x 2220), all tissue
REGIONS = {"aligned": (1024, 2048, 512, 1536),     # 2x2 chunks in one shard
           "unaligned": (1300, 2324, 700, 1724)}   # 3x3 chunks across two shards
BUCKET = "bench"
KEY = "bench"  # moto takes any credentials


# ----------------------------------------------------------------------- the servers


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte ranges (206); counts requests and body bytes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):
        server = self.server
        time.sleep(server.latency)
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            server.count(0)
            self.send_error(404, "File not found")
            return None
        size = os.path.getsize(path)
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers.get("Range") or "")
        if m is None or m.groups() == ("", ""):
            start, end, status = 0, size - 1, 200
        else:
            first, last = m.groups()
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            status = 206
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(max(end - start + 1, 0))
        server.count(len(body) if self.command != "HEAD" else 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency = 0.0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.nbytes = 0

    def count(self, nbytes: int, request: bool = True) -> None:
        with self.lock:
            self.requests += request
            self.nbytes += nbytes


class HttpServer(http.server.ThreadingHTTPServer, Counter):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        http.server.ThreadingHTTPServer.__init__(
            self, ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
        Counter.__init__(self)


class CountingApp(Counter):
    """WSGI middleware around moto's S3 application: latency, requests, body bytes."""

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app

    def __call__(self, environ, start_response):
        time.sleep(self.latency)
        self.count(0)  # counted before the answer: complete once the client has it
        return self._count(environ, self.app(environ, start_response))

    def _count(self, environ, body):
        try:
            for part in body:
                if environ["REQUEST_METHOD"] != "HEAD":
                    self.count(len(part), request=False)
                yield part
        finally:
            if hasattr(body, "close"):
                body.close()


def start_s3(store: Path):
    import boto3
    import moto.server
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = CountingApp(moto.server.DomainDispatcherApplication(moto.server.create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         request_handler=moto.server.MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=KEY, aws_secret_access_key=KEY)
    client.create_bucket(Bucket=BUCKET)
    for path in store.rglob("*"):
        if path.is_file():
            key = f"store.zarr/{path.relative_to(store).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    return server, app, endpoint


# ---------------------------------------------------------------------------- timing


def measure(url: str, options: dict | None, counter: Counter | None,
            region: tuple[int, int, int, int], repeat: int, batch_size: int,
            reference: np.ndarray) -> dict:
    y0, y1, x0, x1 = region
    with zarr.config.set({"codec_pipeline.batch_size": batch_size}):
        if counter:
            counter.reset()
        start = time.perf_counter()
        kwargs = {"storage_options": options} if options else {}
        array = zarr.open_group(url, mode="r", **kwargs)["0"]
        open_s = time.perf_counter() - start
        open_requests = counter.requests if counter else None
        seconds, requests, nbytes = [], set(), set()
        for _ in range(repeat):
            if counter:
                counter.reset()
            start = time.perf_counter()
            region_px = array[:, y0:y1, x0:x1]
            seconds.append(time.perf_counter() - start)
            if counter:
                requests.add(counter.requests)
                nbytes.add(counter.nbytes)
            if not np.array_equal(region_px, reference):
                raise SystemExit(f"{url}: the region differs from the local store's")
    return {"open_s": open_s, "open_requests": open_requests,
            "read_s_median": statistics.median(seconds), "read_s_min": min(seconds),
            "read_s": seconds,
            "requests": sorted(requests) if counter else None,
            "bytes": sorted(nbytes) if counter else None}


def fetch_only(url: str, options: dict | None, store_dir: Path,
               region: tuple[int, int, int, int], repeat: int) -> float:
    """Median seconds to fetch what a region read fetches (the touched shards' indexes,
    then the touched chunks, each step concurrently, as zarr does), without decoding."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    meta = json.loads((store_dir / "0" / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][1]
    chunk = meta["codecs"][0]["configuration"]["chunk_shape"][1]
    n = shard // chunk
    index_bytes = n * n * 16 + 4
    y0, y1, x0, x1 = region
    shards = [(sy, sx) for sy in range(y0 // shard, (y1 - 1) // shard + 1)
              for sx in range(x0 // shard, (x1 - 1) // shard + 1)]
    chunks = [(cy, cx) for cy in range(y0 // chunk, (y1 - 1) // chunk + 1)
              for cx in range(x0 // chunk, (x1 - 1) // chunk + 1)]
    if "://" in url:
        store = zarr.storage.FsspecStore.from_url(url, storage_options=options or {},
                                                  read_only=True)
    else:
        store = zarr.storage.LocalStore(url, read_only=True)
    proto = default_buffer_prototype()

    async def fetch() -> int:
        keys = [f"0/c/0/{sy}/{sx}" for sy, sx in shards]
        indexes = await asyncio.gather(*(store.get(k, proto, SuffixByteRequest(index_bytes))
                                         for k in keys))
        wanted = []
        for (sy, sx), key, buf in zip(shards, keys, indexes, strict=True):
            if buf is None:
                continue
            table = np.frombuffer(buf.to_bytes()[:-4], "<u8").reshape(n, n, 2)
            for cy, cx in chunks:
                if cy // n == sy and cx // n == sx:
                    off, length = (int(v) for v in table[cy % n, cx % n])
                    if off != 2**64 - 1:
                        wanted.append((key, RangeByteRequest(off, off + length)))
        got = await asyncio.gather(*(store.get(k, proto, r) for k, r in wanted))
        return sum(len(b) for b in got if b is not None)

    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        sync(fetch())
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def expected_chunks(store: Path, region: tuple[int, int, int, int]) -> tuple[int, int]:
    """(shards, chunks) of level 0 that the region touches."""
    meta = json.loads((store / "0" / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][1]
    chunk = meta["codecs"][0]["configuration"]["chunk_shape"][1]
    y0, y1, x0, x1 = region

    def cells(step: int) -> int:
        return ((y1 - 1) // step - y0 // step + 1) * ((x1 - 1) // step - x0 // step + 1)

    return cells(shard), cells(chunk)


def convert(slide: Path, out: Path) -> None:
    print(f"converting {slide.name} (dlwsi, NGFF 0.5) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "ngff_convert", str(slide), str(out),
                    "--no-progress"], check=True)


def title(results: dict) -> str:
    return "Reading one 1024x1024 region: local store, HTTP and S3 on loopback"


def render(results: dict) -> str:
    """The page body: the store, and per region, batch size, store and latency the
    times, requests and bytes of one read."""
    store, device = results["store"], results["device"]
    lines = []
    for r in results["rows"]:
        requests = "-" if r["requests"] is None else "/".join(map(str, r["requests"]))
        kib = "-" if r["bytes"] is None else "/".join(f"{b / 1024:.0f}" for b in r["bytes"])
        lines.append([r["region"], r["chunks_touched"], r["batch_size"], r["store"],
                      f"{r['latency_ms']:.0f}", f"{r['open_s']:.3f}",
                      f"{r['read_s_median']:.3f}", f"{r['fetch_only_s_median']:.3f}",
                      requests, kib])
    return "\n".join([
        f"The store: {store['source']} converted with the defaults (NGFF 0.5, dlwsi, 512² "
        f"chunks in 2048² shards), {store['bytes'] / 2**10:.0f} KiB in {store['objects']} "
        "objects. Read with zarr "
        f"{device['zarr']} from its folder, over HTTP from Python's `http.server` on "
        "127.0.0.1 (single byte ranges) and over S3 from moto's server on 127.0.0.1; "
        "latency: a delay added before every answer of both servers. open: the group and "
        "level 0; read: the region, median of "
        f"{results['settings']['repeat']}; fetch: the same byte ranges fetched without "
        "decoding; requests and KiB per read as the servers counted them. batch: zarr's "
        "`codec_pipeline.batch_size`."
        + (f" Load average when the run ended: {device['load_average'][0]:.1f} on "
           f"{device['logical_cpus']} CPUs." if device.get("load_average") else ""), "",
        table(["region", "chunks", "batch", "store", "latency ms", "open s", "read s",
               "fetch s", "requests", "KiB"], lines)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, help="an NGFF 0.5 store (default: convert "
                   "CMU-1-Small-Region with the defaults into a temporary folder)")
    p.add_argument("--slide", type=Path, default=SLIDE)
    p.add_argument("--region", help="y0,y1,x0,x1 of level 0 (default: two 1024x1024 "
                   "regions of CMU-1-Small-Region, chunk-aligned and not)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch-size", default="1,16", help="zarr codec_pipeline.batch_size "
                   "values (default 1,16)")
    p.add_argument("--latency-ms", default="0,50",
                   help="delay added by the servers before each answer (default 0,50)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    regions = ({"region": tuple(int(v) for v in args.region.split(","))} if args.region
               else REGIONS)
    batch_sizes = [int(v) for v in args.batch_size.split(",")]
    latencies = [float(v) for v in args.latency_ms.split(",")]
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            store = Path(tmp) / "store.zarr"
            convert(args.slide, store)
        store = store.resolve()
        http_server = HttpServer(store.parent)
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        s3_server, s3_app, endpoint = start_s3(store)
        stores = {
            "local": (str(store), None, None),
            "http": (f"http://127.0.0.1:{http_server.server_port}/{store.name}", None,
                     http_server),
            "s3": (f"s3://{BUCKET}/store.zarr", {"endpoint_url": endpoint}, s3_app),
        }
        files = [f for f in store.rglob("*") if f.is_file()]
        store_info = {"bytes": sum(f.stat().st_size for f in files), "objects": len(files),
                      "level0_shape": list(zarr.open_array(store, path="0").shape)}
        rows = []
        for region_name, region in regions.items():
            y0, y1, x0, x1 = region
            reference = zarr.open_group(store, mode="r")["0"][:, y0:y1, x0:x1]  # warm-up
            shards, chunks = expected_chunks(store, region)
            for batch_size in batch_sizes:
                for latency in latencies:
                    for kind, (url, options, counter) in stores.items():
                        if kind == "local" and latency != latencies[0]:
                            continue
                        if counter:
                            counter.latency = latency / 1000
                        m = measure(url, options, counter, region, args.repeat, batch_size,
                                    reference)
                        if counter:
                            counter.reset()
                        m["fetch_only_s_median"] = fetch_only(url, options, store, region,
                                                              args.repeat)
                        if counter:
                            m["fetch_only_requests"] = counter.requests / args.repeat
                        row = {"region": region_name, "yx": list(region),
                               "shards_touched": shards, "chunks_touched": chunks,
                               "store": kind, "batch_size": batch_size,
                               "latency_ms": latency if counter else 0.0, **m}
                        rows.append(row)
                        print(f"{region_name:>9} bs={batch_size:<2} {kind:>5} "
                              f"lat={row['latency_ms']:>4.0f}ms open {m['open_s']:.3f}s "
                              f"read {m['read_s_median']:.3f}s (min {m['read_s_min']:.3f}) "
                              f"fetch {m['fetch_only_s_median']:.3f}s "
                              f"requests {m['requests']} bytes {m['bytes']}",
                              file=sys.stderr)
        http_server.shutdown()
        s3_server.shutdown()

    print()
    print(f"{'region':>9} {'batch':>5} {'store':>5} {'latency':>8} {'open s':>7} "
          f"{'read s':>7} {'fetch s':>7} {'requests':>8} {'KiB':>7}")
    for r in rows:
        req = "-" if r["requests"] is None else "/".join(map(str, r["requests"]))
        kib = "-" if r["bytes"] is None else "/".join(f"{b / 1024:.0f}" for b in r["bytes"])
        print(f"{r['region']:>9} {r['batch_size']:>5} {r['store']:>5} "
              f"{r['latency_ms']:>6.0f}ms {r['open_s']:>7.3f} {r['read_s_median']:>7.3f} "
              f"{r['fetch_only_s_median']:>7.3f} {req:>8} {kib:>7}")
    if args.json:
        import numcodecs_dlwsi

        results = {
            **provenance("remote_read", argv),
            "settings": {"repeat": args.repeat, "batch_sizes": batch_sizes,
                         "latencies_ms": latencies, "regions": regions},
            "store": {"source": args.slide.name if args.store is None else str(args.store),
                      **store_info},
            "device": {"cpu": platform.processor() or platform.machine(),
                       "logical_cpus": os.cpu_count(),
                       "load_average": [round(v, 2) for v in os.getloadavg()],
                       "python": platform.python_version(),
                       "zarr": zarr.__version__, "numcodecs_dlwsi": numcodecs_dlwsi.__version__,
                       **{m: __import__(m).__version__ for m in ("fsspec", "s3fs", "aiohttp",
                                                                 "moto")}},
            "rows": rows,
        }
        print(f"wrote {publish(args.json, results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
