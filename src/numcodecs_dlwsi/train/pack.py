"""Data packs: a byte-budgeted, lossless sample of the training side that travels.

A GPU machine reached without network and without ``shared/data`` trains from a pack:
one ``.npz`` file holding regions of the training images (every training-side H&E file
and the training slides at the scales :func:`data.training_sources` gives), each stored
as lossless WebP (or PNG), plus the deterministic validation tiles, plus a JSON record of
exactly which file, scale and rectangle every region came from. Regions are a seeded
random choice among non-overlapping tiles of the training images, taken until the byte
budget is full, so a pack is a uniform (area-weighted) subsample of the training side and
never holds a validation pixel.

:class:`TorchCropSampler` draws training crops from a pack's regions (or any list of
images) with the same distribution as :class:`data.CropSampler` -- image by area, uniform
position, one of the 8 flips/rotations -- but builds whole batches with tensor indexing,
so the images can live on the GPU and data loading never starves it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import VALIDATION_FILES, training_sources, validation_tiles

if TYPE_CHECKING:
    import torch

PACK_FORMAT = "dlwsi-train-pack-1"
#: Bytes kept free under the budget for the meta record and the npz container.
_OVERHEAD = 256 * 1024


def _encode(image: np.ndarray, codec: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if codec == "webp":
        # lossless; quality is the encoder's effort there (50: 3x faster than 100, ~same size)
        Image.fromarray(image).save(buffer, "WEBP", lossless=True, quality=50, method=4,
                                    exact=True)
    elif codec == "png":
        Image.fromarray(image).save(buffer, "PNG", compress_level=9)
    else:
        raise ValueError(f"codec must be 'webp' or 'png', not {codec!r}")
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def _cuts(length: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, length) into max(1, length // tile) near-equal parts (each >= tile)."""
    edges = np.linspace(0, length, max(1, length // tile) + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def build_pack(root: Path, out: Path, budget_mb: float = 20.0, tile: int = 256,
               min_side: int = 256, val_per_image: int = 4, seed: int = 0,
               codec: str = "webp", log: bool = True) -> dict:
    """Write a pack of at most ``budget_mb`` MiB to ``out``; returns its meta record."""
    if tile < min_side:
        raise ValueError(f"tile ({tile}) must be at least min_side ({min_side})")
    sources, regions = [], []
    for index, (rel, factor, image) in enumerate(training_sources(root)):
        sources.append((rel, factor, image))
        if min(image.shape[:2]) < min_side:
            continue
        for y0, y1 in _cuts(image.shape[0], tile):
            for x0, x1 in _cuts(image.shape[1], tile):
                regions.append((index, y0, x0, y1 - y0, x1 - x0))
    if not regions:
        raise ValueError(f"no training image under {root} is {min_side} pixels on each side")

    budget = int(budget_mb * 2**20) - _OVERHEAD
    val_blobs = []
    if val_per_image:
        val = validation_tiles(root, size=256, per_image=val_per_image)
        val_blobs = [_encode(np.ascontiguousarray(t.transpose(1, 2, 0)), codec) for t in val]
        budget -= sum(len(b) for b in val_blobs)
    if budget <= 0:
        raise ValueError(f"{budget_mb} MiB does not even hold the validation tiles")

    chosen, blobs, used = [], [], 0
    for k in np.random.default_rng(seed).permutation(len(regions)).tolist():
        index, y, x, h, w = regions[k]
        pixels = np.ascontiguousarray(sources[index][2][y : y + h, x : x + w])
        blob = _encode(pixels, codec)
        if used + len(blob) > budget:
            break
        if not np.array_equal(_decode(blob), pixels):
            raise RuntimeError(f"{codec} round trip is not lossless on this system")
        chosen.append(k)
        blobs.append(blob)
        used += len(blob)
    order = np.argsort(chosen, kind="stable")  # regions in source order
    chosen = [chosen[i] for i in order]
    blobs = [blobs[i] for i in order]

    def record(k: int) -> list:
        index, y, x, h, w = regions[k]
        return [sources[index][0], sources[index][1], y, x, h, w]

    source_px = sum(im.shape[0] * im.shape[1] for _, _, im in sources)
    packed_px = sum(regions[k][3] * regions[k][4] for k in chosen)
    meta = {
        "format": PACK_FORMAT,
        "codec": codec,
        "seed": seed,
        "tile": tile,
        "min_side": min_side,
        "budget_mb": budget_mb,
        # [file relative to shared/data, downsample factor, top, left, height, width]
        "regions": [record(k) for k in chosen],
        "trained_on": sorted({sources[regions[k][0]][0] for k in chosen}),
        "training_side": sorted({rel for rel, _, _ in sources}),
        "validation_files": [rel for rel in VALIDATION_FILES if (root / rel).exists()],
        "val_tiles": len(val_blobs),
        "val_per_image": val_per_image,
        "val_size": 256,
        "source_megapixels": round(source_px / 1e6, 3),
        "packed_megapixels": round(packed_px / 1e6, 3),
        "candidate_regions": len(regions),
    }
    arrays = {"meta": np.array(json.dumps(meta))}
    for name, group in (("regions", blobs), ("val", val_blobs)):
        sizes = [len(b) for b in group]
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"{name}_data"] = np.frombuffer(b"".join(group), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # payloads are compressed already
    tmp.replace(out)
    if log:
        print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(chosen)} of {len(regions)} "
              f"regions ({meta['packed_megapixels']} of {meta['source_megapixels']} MP) from "
              f"{len(meta['trained_on'])} files, {len(val_blobs)} validation tiles")
    return meta


@dataclass
class Pack:
    regions: list[np.ndarray]  # uint8 (H, W, 3)
    val: np.ndarray | None  # uint8 (N, 3, 256, 256), or None when the pack has none
    meta: dict
    sha256: str


def _blobs(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def load_pack(path: Path) -> Pack:
    """Decode every region and validation tile of a pack (lossless, so exact)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"{path} is not a {PACK_FORMAT} pack")
        regions = [_decode(b) for b in _blobs(f["regions_data"], f["regions_offsets"])]
        val_tiles = [_decode(b) for b in _blobs(f["val_data"], f["val_offsets"])]
    val = np.stack([t.transpose(2, 0, 1) for t in val_tiles]) if val_tiles else None
    return Pack(regions, None if val is None else np.ascontiguousarray(val), meta, digest)


class TorchCropSampler:
    """Random crops with flips and 90 degree rotations, weighted by image area, on a device.

    All images sit in one flat uint8 tensor; a batch is one gather, so on a GPU it costs a
    few kernels instead of a Python loop over crops and a host-to-device copy.
    """

    def __init__(self, images: list[np.ndarray], crop: int, seed: int = 0,
                 device: str = "cpu") -> None:
        import torch

        images = [im for im in images if min(im.shape[:2]) >= crop]
        if not images:
            raise ValueError(f"no training image is at least {crop} pixels on each side")
        self.crop = crop
        self.device = torch.device(device)
        sizes = [im.size for im in images]
        flat = np.concatenate([np.ascontiguousarray(im).reshape(-1) for im in images])
        self.data = torch.from_numpy(flat).to(self.device)
        self.offsets = torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.int64,
                                    device=self.device)
        self.heights = torch.tensor([im.shape[0] for im in images], device=self.device)
        self.widths = torch.tensor([im.shape[1] for im in images], device=self.device)
        areas = (self.heights * self.widths).double()
        self.weights = areas / areas.sum()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.grid = torch.arange(crop, device=self.device)
        self.channels = torch.arange(3, device=self.device).view(1, 3, 1, 1)

    def batch(self, size: int) -> torch.Tensor:
        """float32 (size, 3, crop, crop) in [0, 1], on the sampler's device."""
        import torch

        g, c, dev = self.generator, self.crop, self.device
        pick = torch.multinomial(self.weights, size, replacement=True, generator=g)
        h = self.heights[pick].view(-1, 1, 1)
        w = self.widths[pick].view(-1, 1, 1)
        top = (torch.rand(size, 1, 1, generator=g, device=dev) * (h - c + 1)).long()
        left = (torch.rand(size, 1, 1, generator=g, device=dev) * (w - c + 1)).long()
        top, left = torch.minimum(top, h - c), torch.minimum(left, w - c)
        # the 8 symmetries of the square: optional transpose, then optional flips
        swap, flip_rows, flip_cols = torch.randint(
            0, 2, (3, size, 1, 1), generator=g, device=dev).bool()
        i, j = self.grid.view(1, c, 1), self.grid.view(1, 1, c)
        rows, cols = torch.where(swap, j, i), torch.where(swap, i, j)
        rows = torch.where(flip_rows, c - 1 - rows, rows)
        cols = torch.where(flip_cols, c - 1 - cols, cols)
        pixel = self.offsets[pick].view(-1, 1, 1) + ((top + rows) * w + left + cols) * 3
        return self.data[pixel.unsqueeze(1) + self.channels].float().div_(255.0)
