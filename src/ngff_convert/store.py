"""Output stores: local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``, ...).

Credentials for object stores come from the usual places (environment, config files,
instance roles) through fsspec / s3fs; nothing here handles secrets. For ``s3://`` that
is botocore's chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws``; the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. ``--storage-option KEY=VALUE`` (:func:`parse_storage_options`)
passes anything else to the fsspec filesystem and wins over the environment.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from . import ConvertError, one_line
from .ownership import local_keys

PROGRESS_KEY = "ngff_convert"  # attribute of an image group written by us


@dataclass
class Output:
    """A destination: where it is, its Zarr store, and (for URLs) its fsspec filesystem."""

    url: str
    store: Store
    local: Path | None
    fs: Any = None  # fsspec filesystem for URLs
    fs_path: str = ""

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists() and (not self.local.is_dir() or any(self.local.iterdir()))
        return bool(self.fs.exists(self.fs_path))

    def remove(self) -> None:
        if self.local is not None:
            if self.local.is_dir():
                shutil.rmtree(self.local)
            elif self.local.exists():
                self.local.unlink()
        elif self.fs.exists(self.fs_path):
            self.fs.rm(self.fs_path, recursive=True)

    def discard_partial_writes(self) -> int:
        """Remove zarr's temporary ``*.partial`` files left by a killed local write.

        zarr's LocalStore writes each object to ``<key>.<uuid>.partial`` and renames it into
        place, so a kill leaves the temporary file but never a half-written object. Object
        stores upload atomically and leave nothing behind.
        """
        if self.local is None or not self.local.is_dir():
            return 0
        stale = [p for p in self.local.rglob("*.partial") if p.is_file()]
        for path in stale:
            path.unlink()
        return len(stale)

    def all_keys(self) -> list[str]:
        """Every object under the store, as keys relative to its root."""
        if self.local is not None:
            return local_keys(self.local) if self.local.is_dir() else []
        root = self.fs_path.rstrip("/") + "/"
        return [path[len(root):] for path in self.fs.find(self.fs_path)
                if path.startswith(root)]

    def is_bucket_root(self) -> bool:
        return self.local is None and "/" not in self.fs_path.strip("/")

    def keys(self, prefix: str) -> set[str]:
        """Keys stored under ``prefix`` (one listing, not one request per key)."""
        async def collect() -> set[str]:
            return {k async for k in self.store.list_prefix(prefix)}
        return sync(collect())

    def size(self, prefix: str = "") -> tuple[int, int]:
        """(bytes, objects) stored under ``prefix``."""
        if self.local is not None:
            root = self.local / prefix if prefix else self.local
            total = count = 0
            for dirpath, _, files in os.walk(root):
                for name in files:
                    total += os.path.getsize(os.path.join(dirpath, name))
                    count += 1
            return total, count
        path = f"{self.fs_path}/{prefix}".rstrip("/")
        if not self.fs.exists(path):
            return 0, 0
        sizes = self.fs.du(path, total=False)
        return int(sum(sizes.values())), len(sizes)


def is_url(target: str) -> bool:
    return "://" in target


S3_PROTOCOLS = ("s3", "s3a")
# fsspec's own keyword arguments, accepted by every filesystem
FSSPEC_KEYS = {"use_listings_cache", "listings_expiry_time", "max_paths",
               "skip_instance_cache"}
# the pre-flight request (does the bucket exist, can we reach it) fails fast: a dead
# endpoint is reported in seconds, not after botocore's and s3fs's retries
PROBE_TIMEOUT_S = 5
PROBE_ATTEMPTS = 2
# boto3's names for what s3fs calls otherwise
S3_ALIASES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret",
              "aws_session_token": "token", "region_name": "client_kwargs.region_name",
              "region": "client_kwargs.region_name"}
# always strings, even when they look like numbers (an all-digit secret stays a secret)
STRING_OPTIONS = {"key", "secret", "token", "username", "password", "endpoint_url",
                  "profile", "region_name"}
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> fsspec storage options.

    Values: ``true``/``false`` -> bool, ``none``/``null`` -> None, integers and decimals
    -> numbers, ``{...}``/``[...]`` -> JSON, anything else a string; credentials, names and
    URLs (:data:`STRING_OPTIONS`) are taken as they are. A dotted key nests:
    ``client_kwargs.region_name=eu-west-1`` -> ``{"client_kwargs": {"region_name": ...}}``.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(part.isidentifier() for part in parts):
            raise ConvertError(f"--storage-option must be KEY=VALUE (e.g. "
                               f"endpoint_url=http://127.0.0.1:9000), got {item!r}")
        raw = raw.strip()
        if not raw:
            raise ConvertError(f"--storage-option {key}: no value after '='")
        node = options
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConvertError(f"--storage-option {key}: "
                                   f"{'.'.join(parts[:depth + 1])} is already set to a value")
        if isinstance(node.get(parts[-1]), dict):
            raise ConvertError(f"--storage-option {key}: already given as {key}.KEY=...")
        node[parts[-1]] = raw if parts[-1] in STRING_OPTIONS else _option_value(key, raw)
    return options


def _option_value(key: str, raw: str) -> Any:
    lower = raw.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in ("none", "null"):
        return None
    if _NUMBER.fullmatch(raw):
        return int(raw) if re.fullmatch(r"[+-]?\d+", raw) else float(raw)
    if raw[0] in "{[":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConvertError(f"--storage-option {key}: not valid JSON ({exc})") from None
    return raw


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _check_option_names(url: str, options: dict[str, Any]) -> None:
    """Refuse misspelt s3 options now, not as a TypeError deep inside botocore."""
    if _protocol(url) not in S3_PROTOCOLS or not options:
        return
    import inspect

    import aiobotocore.session
    import s3fs

    known = set(FSSPEC_KEYS)
    for fn in (s3fs.S3FileSystem.__init__, aiobotocore.session.AioSession.__init__):
        known |= {name for name, p in inspect.signature(fn).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    known -= {"asynchronous", "loop", "session"}  # ours to set, or not from a command line
    for name in options:
        if name not in known:
            close = [S3_ALIASES[name]] if name in S3_ALIASES else \
                difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else \
                f"; s3 takes {', '.join(sorted(known))}"
            raise ConvertError(f"--storage-option {name}: not an option of s3 (s3fs){hint}")


def open_output(target: str, *, read_only: bool = False,
                storage_options: dict[str, Any] | None = None) -> Output:
    """An :class:`Output` for a local path or an fsspec URL (nothing is written yet).

    For ``s3://`` the bucket is checked first (two or three small requests, ~10 s at
    most), so a missing bucket, missing credentials, denied access or an unreachable
    endpoint fail with one line.
    """
    if is_url(target):
        options = dict(storage_options or {})
        _check_option_names(target, options)
        if target.startswith(("file://", "local://")):
            # local-filesystem URLs need parent folders created as objects are written
            options.setdefault("auto_mkdir", True)
        try:
            import fsspec

            store = zarr.storage.FsspecStore.from_url(target, storage_options=options,
                                                      read_only=read_only)
            # a synchronous twin (exists/rm/du) with the same options; it must not
            # answer from a listing cached before the store above wrote anything
            sync_options = dict(options)
            if _protocol(target) in S3_PROTOCOLS:
                sync_options.setdefault("use_listings_cache", False)
            fs, _ = fsspec.url_to_fs(target, **sync_options)
        except ImportError as exc:
            raise ConvertError(f"{target}: cannot use this URL: missing package "
                               f"{exc.name or exc}") from None
        except (ValueError, TypeError) as exc:
            raise ConvertError(f"{target}: cannot use this URL: {one_line(exc)}") from None
        out = Output(url=target, store=store, local=None, fs=fs, fs_path=store.path)
        if _protocol(target) in S3_PROTOCOLS:
            _probe_s3(out, options)
        return out
    if storage_options:
        raise ConvertError(f"{target}: --storage-option applies to URLs (s3://...), "
                           "not to local paths")
    path = Path(target).expanduser()
    # absolute: the store travels to dask.distributed workers, whose working
    # directory is not ours
    store = zarr.storage.LocalStore(path.absolute(), read_only=read_only)
    return Output(url=str(path), store=store, local=path)


def _probe_s3(out: Output, options: dict[str, Any]) -> None:
    """A HEAD of the bucket and of the store's ``zarr.json``, with short timeouts and one
    retry: a clear line for a missing bucket, missing credentials, denied access or a
    dead endpoint, before anything else."""
    import fsspec
    from botocore.exceptions import (
        BotoCoreError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", PROBE_TIMEOUT_S)
    config.setdefault("read_timeout", PROBE_TIMEOUT_S)
    config["retries"] = {"total_max_attempts": PROBE_ATTEMPTS, "mode": "standard"}
    probe = fsspec.filesystem(_protocol(out.url), **{**options, "config_kwargs": config,
                                                     "skip_instance_cache": True})
    probe.retries = 1  # s3fs's own retry loop, on top of botocore's
    bucket, _, prefix = out.fs_path.partition("/")
    where = f"{out.url}: bucket {bucket!r}"
    try:
        endpoint = probe.s3.meta.endpoint_url  # builds the client; no request yet
    except BotoCoreError as exc:  # e.g. a malformed endpoint_url
        raise ConvertError(f"{out.url}: cannot set up S3: {one_line(exc)}") from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{out.url}: cannot set up S3: {one_line(exc)}") from None
    try:
        try:
            probe.call_s3("head_bucket", Bucket=bucket)
        except PermissionError:
            # a policy may deny HEAD on the bucket but allow listing our prefix, which
            # is all we need (exists, resume); only when that is denied too give up
            probe.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        try:  # reading objects may be denied where listing is not
            probe.call_s3("head_object", Bucket=bucket, Key=f"{prefix}/zarr.json".lstrip("/"))
        except FileNotFoundError:
            pass
    except FileNotFoundError:
        raise ConvertError(f"{where} does not exist at {endpoint}") from None
    except PermissionError as exc:
        how = "anonymously (anon=true)" if options.get("anon") else "with these credentials"
        raise ConvertError(f"{where} at {endpoint}: access denied {how} "
                           f"({one_line(exc)})") from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise ConvertError(f"{out.url}: no S3 credentials ({one_line(exc)}): set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                           "--storage-option key=... secret=..., or anon=true for a public "
                           "bucket") from None
    except (ConnectionError, HTTPClientError, TimeoutError) as exc:
        raise ConvertError(f"{out.url}: cannot reach the S3 endpoint {endpoint} "
                           f"({one_line(exc)}); set it with AWS_ENDPOINT_URL or "
                           "--storage-option endpoint_url=...") from None
    except (BotoCoreError, OSError) as exc:  # s3fs maps other S3 errors to OSError
        raise ConvertError(f"{where} at {endpoint}: {one_line(exc)}") from None


HTTP_PROTOCOLS = ("http", "https")


def check_range_support(out: Output, key: str = "zarr.json") -> None:
    """A sharded store over HTTP is read in byte ranges (each shard's index, then each
    chunk). A server that ignores the Range header sends whole objects instead, which
    zarr reports as a checksum mismatch; say what is wrong, once, before reading."""
    if out.local is not None or _protocol(out.url) not in HTTP_PROTOCOLS:
        return
    try:
        sample = out.fs.cat_file(f"{out.fs_path.rstrip('/')}/{key}", start=0, end=2)
    except Exception:  # noqa: BLE001 - a missing object fails later with its own message
        return
    if len(sample) > 2:
        raise ConvertError(f"{out.url}: the server ignores HTTP byte ranges (it sent "
                           f"{len(sample)} bytes for a 2-byte range); a sharded store (NGFF "
                           "0.5) is read in ranges. Serve it from a range-capable server "
                           "(nginx, Apache, a CDN or an object store), or convert with "
                           "--ngff 0.4 or --shard 1 (no shards)")


def check_writable(out: Output) -> None:
    """Fail early, with one line, when the destination cannot be written."""
    try:
        if out.local is not None:
            if out.local.exists() and not out.local.is_dir():
                raise ConvertError(f"{out.url}: exists and is not a directory")
            out.local.mkdir(parents=True, exist_ok=True)
            probe = out.local / ".ngff-convert-probe"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            if _protocol(out.url) not in S3_PROTOCOLS:  # s3fs would create a bucket
                out.fs.makedirs(out.fs_path, exist_ok=True)
            out.fs.pipe(f"{out.fs_path}/.ngff-convert-probe", b"")
            out.fs.rm(f"{out.fs_path}/.ngff-convert-probe")
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error means "not writable"
        raise ConvertError(f"{out.url}: cannot write there: {one_line(exc)}") from None


def create_level(group: zarr.Group, name: str, shape: tuple[int, int, int], chunk: int,
                 chunks_per_shard: int, zarr_format: int,
                 codecs: dict[str, Any]) -> zarr.Array:
    """A (3, h, w) uint8 level array, fill 255 (glass), chunk-aligned shards for v3.

    ``codecs`` holds ``filters``/``serializer``/``compressors`` (v3) or ``compressors``
    (v2). Empty (all-255) chunks are never written.
    """
    chunks = (3, chunk, chunk)
    common: dict[str, Any] = {
        "name": name, "shape": shape, "chunks": chunks, "dtype": "uint8",
        "fill_value": 255, "overwrite": True, "config": {"write_empty_chunks": False},
    }
    if zarr_format == 3:
        shards = None
        if chunks_per_shard > 1:
            # shards no larger than the level needs, in whole chunks
            shards = (3, *(chunk * min(chunks_per_shard, -(-n // chunk)) for n in shape[1:]))
        return group.create_array(**common, shards=shards, dimension_names=["c", "y", "x"],
                                  **codecs)
    return group.create_array(**common, chunk_key_encoding={"name": "v2", "separator": "/"},
                              **codecs)
