"""Where released models live, and how a (model id, quality, hash) is pinned to a file.

Each weights folder has a ``manifest.json``::

    {"default": "<model id>", "default_quality": {"<model id>": 3},
     "models": {"<model id>": {"<quality>": {"file": "...", "sha256": "..."}}}}

Folders searched, first match wins: ``$DLWSI_WEIGHTS`` (os.pathsep-separated), the
``weights`` folder inside the installed package, the repository's ``weights/``.
A file is used only if its SHA-256 equals the one pinned in the codec configuration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .model_file import ModelFile, read_model_file

ENV_WEIGHTS = "DLWSI_WEIGHTS"
MANIFEST = "manifest.json"


class ModelNotAvailableError(ValueError):
    """The model a chunk or an array names is not installed (or not with that hash)."""


@dataclass(frozen=True)
class ModelRef:
    model: str
    quality: int
    sha256: str
    path: Path

    @property
    def hash_prefix(self) -> bytes:
        return bytes.fromhex(self.sha256)[:8]


def weights_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(ENV_WEIGHTS, "").split(os.pathsep) if p]
    package = Path(__file__).resolve().parent
    dirs += [package / "weights", package.parents[1] / "weights"]
    return [d for d in dirs if (d / MANIFEST).is_file()]


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"unreadable weights manifest {folder / MANIFEST}: {exc}"
                                     ) from None
    manifest.setdefault("models", {})
    return manifest


def _entries(model: str, quality: int) -> list[tuple[Path, dict]]:
    found = []
    for folder in weights_dirs():
        entry = _read_manifest(folder)["models"].get(model, {}).get(str(quality))
        if entry:
            found.append((folder / entry["file"], entry))
    return found


def released_in(folder: Path) -> dict[str, dict]:
    """model id -> {quality: entry} of ``folder``'s manifest (empty without one)."""
    return _read_manifest(folder)["models"] if (folder / MANIFEST).exists() else {}


def default_model() -> str:
    for folder in weights_dirs():
        default = _read_manifest(folder).get("default")
        if default:
            return default
    raise ModelNotAvailableError(
        "no dlwsi weights are installed: reinstall numcodecs-dlwsi or set $DLWSI_WEIGHTS")


def qualities(model: str) -> list[int]:
    levels: set[int] = set()
    for folder in weights_dirs():
        levels.update(int(q) for q in _read_manifest(folder)["models"].get(model, {}))
    return sorted(levels)


def default_quality(model: str) -> int:
    for folder in weights_dirs():
        quality = _read_manifest(folder).get("default_quality", {}).get(model)
        if quality:
            return int(quality)
    levels = qualities(model)
    if not levels:
        raise ModelNotAvailableError(f"dlwsi model {model!r} is not installed")
    return levels[len(levels) // 2]


def resolve(model: str | None, quality: int | None, sha256: str | None = None,
            hash_prefix: bytes | None = None) -> ModelRef:
    """Pin a model id + quality (+ expected hash or its chunk-header prefix) to a file."""
    model = model or default_model()
    quality = default_quality(model) if quality is None else quality
    entries = _entries(model, quality)
    if not entries:
        levels = qualities(model)
        if levels:
            raise ModelNotAvailableError(
                f"dlwsi model {model!r} has no quality {quality}; installed qualities: "
                f"{', '.join(map(str, levels))}")
        raise ModelNotAvailableError(
            f"dlwsi model {model!r} (quality {quality}"
            + (f", sha256 {sha256}" if sha256 else "")
            + ") is not installed; install a numcodecs-dlwsi release that ships it or put "
            f"its weights folder on ${ENV_WEIGHTS}")
    for path, entry in entries:
        ref = ModelRef(model, quality, entry["sha256"], path)
        if (sha256 is None or ref.sha256 == sha256) and (
                hash_prefix is None or ref.hash_prefix == hash_prefix):
            return ref
    if sha256 is None:
        raise ModelNotAvailableError(
            f"dlwsi chunk was written by model {model!r} quality {quality} with weights "
            f"{hash_prefix.hex()}..., which are not installed (installed: "
            f"{entries[0][1]['sha256'][:16]}...); refusing to decode with different weights")
    raise ModelNotAvailableError(
        f"dlwsi model {model!r} quality {quality}: data was written with weights sha256 "
        f"{sha256} but the installed weights have sha256 {entries[0][1]['sha256']}; "
        "refusing to decode with different weights")


def load(ref: ModelRef) -> ModelFile:
    """Read a pinned model file after checking its bytes against the pinned hash."""
    model = load_file(ref.path, ref.sha256)
    if model.meta["model"] != ref.model or ref.quality not in model.rungs:
        raise ModelNotAvailableError(
            f"{ref.path} holds {model.meta['model']} quality "
            f"{', '.join(map(str, sorted(model.rungs)))}, not {ref.model} q{ref.quality}")
    return model


@functools.lru_cache(maxsize=16)
def load_file(path: Path, sha256: str) -> ModelFile:
    """One model file, read once however many quality rungs it holds."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelNotAvailableError(f"cannot read dlwsi weights {path}: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ModelNotAvailableError(
            f"dlwsi weights {path} have sha256 {actual}, expected {sha256}: "
            "the file was modified or damaged")
    return read_model_file(path)


def register_model(weights_dir: Path, model: str, quality: int, path: Path,
                   make_default: bool = False, default_quality: bool = False) -> None:
    """Add a freshly exported file to ``weights_dir``'s manifest (export side only)."""
    manifest_path = weights_dir / MANIFEST
    manifest = _read_manifest(weights_dir) if manifest_path.exists() else {"models": {}}
    entries = manifest["models"].setdefault(model, {})
    if str(quality) in entries:
        raise FileExistsError(f"{model} quality {quality} is already released")
    entries[str(quality)] = {"file": path.name,
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest["models"][model] = dict(sorted(entries.items(), key=lambda kv: int(kv[0])))
    if make_default or not manifest.get("default"):
        manifest["default"] = model
    if default_quality:
        manifest.setdefault("default_quality", {})[model] = quality
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
