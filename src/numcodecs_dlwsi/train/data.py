"""H&E training data: the fixed train/validation split and a random-crop sampler.

The split is by source image (and by source slide where several files come from one
slide), never by tile, so no validation pixel was ever seen in training. Changing it
invalidates every reported number: add new files to one side, never move files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Files held back for validation and benchmarks, relative to ``shared/data``.
VALIDATION_FILES: tuple[str, ...] = (
    "he/monuseg_nc/TCGA-21-5786-01Z-00-DX1.png",
    "he/monuseg_nc/TCGA-A7-A13F-01Z-00-DX1.png",
    "he/monuseg_nc/TCGA-B0-5711-01Z-00-DX1.png",
    "he/monuseg_nc/TCGA-E2-A1B5-01Z-00-DX1.png",
    "he/monuseg_nc/TCGA-G9-6363-01Z-00-DX1.png",
    "he/monuseg_nc/TCGA-HE-7130-01Z-00-DX1.png",
    # three tiles of one slide: all on the validation side
    "he/tcga_tiles_mopadi/TCGA-AD-6964-01Z-00-DX1__Tile_16896_20480.jpg",
    "he/tcga_tiles_mopadi/TCGA-AD-6964-01Z-00-DX1__Tile_22016_11776.jpg",
    "he/tcga_tiles_mopadi/TCGA-AD-6964-01Z-00-DX1__Tile_23040_25088.jpg",
    "he/cryonuseg_tcga/TCGA-S4-A8RO-01A-01-TS1.0FD87A60-9FC1-48B4-8972-5905265EC62E.tif",
    "he/openslide_OS-1/OS-1-detail.ome.tif",
    "he/torchstain/target.png",
    # the README's demo slide: its conversion quality is measured on unseen pixels
    "slides/aperio/CMU-1-Small-Region.svs",
)

#: Whole slides used for training crops (level 0 and a 2x downsample).
TRAINING_SLIDES: tuple[str, ...] = ("slides/aperio/TCGA-CR-7395-01A-01-TS1.svs",)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def default_data_root() -> Path:
    """``../shared/data`` beside the repository, or ``$DLWSI_DATA``."""
    env = os.environ.get("DLWSI_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def he_files(root: Path, split: str) -> list[Path]:
    """H&E image files (not slides) of one side of the split, sorted."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    held_out = set(VALIDATION_FILES)
    files = []
    for path in sorted((root / "he").rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        is_val = path.relative_to(root).as_posix() in held_out
        if is_val == (split == "val"):
            files.append(path)
    return files


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): grey expanded, alpha composited onto white (glass)."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8:
        raise ValueError(f"expected 8-bit image, got {image.dtype}")
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        image = np.rint(rgb).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def read_image(path: Path) -> np.ndarray:
    """An H&E image file as uint8 (H, W, 3)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return to_rgb(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        return to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("P", "LA") else im))


def read_slide(path: Path, level: int = 0) -> np.ndarray:
    """A whole (small) slide level as uint8 (H, W, 3), transparent areas white."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        level = min(level, slide.level_count - 1)
        width, height = slide.level_dimensions[level]
        region = slide.read_region((0, 0), level, (width, height))
    return to_rgb(np.asarray(region))


@dataclass
class CropSampler:
    """Random square crops with flips and 90 degree rotations, weighted by image area."""

    images: list[np.ndarray]
    crop: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.images = [im for im in self.images if min(im.shape[:2]) >= self.crop]
        if not self.images:
            raise ValueError(f"no training image is at least {self.crop} pixels on each side")
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(self.seed)

    def batch(self, size: int) -> np.ndarray:
        """uint8 (size, 3, crop, crop)."""
        out = np.empty((size, 3, self.crop, self.crop), dtype=np.uint8)
        for i in range(size):
            image = self.images[self.rng.choice(len(self.images), p=self.weights)]
            top = self.rng.integers(0, image.shape[0] - self.crop + 1)
            left = self.rng.integers(0, image.shape[1] - self.crop + 1)
            tile = image[top : top + self.crop, left : left + self.crop]
            tile = np.rot90(tile, k=int(self.rng.integers(4)))
            if self.rng.integers(2):
                tile = tile[:, ::-1]
            out[i] = tile.transpose(2, 0, 1)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.batch(16)


#: how scanners lay out JPEG tiles, and the share of recompressed crops given each
JPEG_LAYOUTS: dict[str, float] = {"rgb": 0.4, "ycbcr420": 0.45, "ycbcr444": 0.15}


def jpeg_round_trip(pixels: np.ndarray, quality: int, layout: str) -> np.ndarray:
    """(H, W, 3) uint8 after JPEG at ``quality`` in one of :data:`JPEG_LAYOUTS`."""
    import imagecodecs

    if layout == "rgb":  # no colour transform: each channel is coded on its own
        encoded = imagecodecs.jpeg_encode(pixels, level=quality, colorspace="RGB",
                                          outcolorspace="RGB")
        return imagecodecs.jpeg_decode(encoded, colorspace="RGB", outcolorspace="RGB")
    if layout not in ("ycbcr420", "ycbcr444"):
        raise ValueError(f"unknown JPEG layout {layout!r}: one of {', '.join(JPEG_LAYOUTS)}")
    encoded = imagecodecs.jpeg_encode(pixels, level=quality, subsampling=layout[-3:])
    return imagecodecs.jpeg_decode(encoded)


@dataclass(frozen=True)
class JpegRecompression:
    """Re-encode a share of training crops as JPEG at a random quality, in place.

    Slides reach the converter as decoded JPEG, and the codec is judged against those
    pixels, block edges and ringing included, which clean training images never show the
    network. Aperio scanners store JPEG in RGB, each channel coded on its own (CMU-1: RGB
    at quality 30; OpenSlide decodes it so), other scanners as YCbCr, mostly 4:2:0: the
    colour spaces are drawn in :data:`JPEG_LAYOUTS`'s proportions. Each crop's block grid
    starts at its corner, as the source's does at every chunk's corner (tiles and chunks
    are multiples of 16).
    """

    low: int
    high: int
    share: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 100:
            raise ValueError(f"JPEG qualities must satisfy 1 <= low <= high <= 100, "
                             f"not {self.low}-{self.high}")
        if not 0 < self.share <= 1:
            raise ValueError(f"JPEG share must be in (0, 1], not {self.share}")

    def apply(self, crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 (N, 3, H, W): the chosen crops are replaced by their JPEG round trip."""
        chosen = np.flatnonzero(rng.random(len(crops)) < self.share)
        qualities = rng.integers(self.low, self.high + 1, size=len(chosen))
        names, shares = zip(*JPEG_LAYOUTS.items(), strict=True)
        layouts = rng.choice(len(names), size=len(chosen), p=shares)

        def round_trip(job: tuple[int, int, int]) -> None:
            i, quality, layout = job
            pixels = np.ascontiguousarray(crops[i].transpose(1, 2, 0))
            crops[i] = jpeg_round_trip(pixels, quality, names[layout]).transpose(2, 0, 1)

        jobs = list(zip(chosen.tolist(), qualities.tolist(), layouts.tolist(), strict=True))
        # imagecodecs releases the GIL: a GPU run's large batches use every core
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            list(pool.map(round_trip, jobs))
        return crops


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample by an integer factor, like the converter's pyramid."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return np.rint(blocks.mean((1, 3))).astype(np.uint8)


def training_sources(root: Path, with_slides: bool = True
                     ) -> Iterator[tuple[str, int, np.ndarray]]:
    """(file relative to ``root``, downsample factor, image) of every training image."""
    for path in he_files(root, "train"):
        yield path.relative_to(root).as_posix(), 1, read_image(path)
    if with_slides:
        for rel in TRAINING_SLIDES:
            path = root / rel
            if path.exists():
                full = read_slide(path, 0)
                yield rel, 1, full
                # pyramid levels are stored too, and downsampled tissue is denser in detail
                for factor in (2, 4):
                    yield rel, factor, downsample(full, factor)


def load_training_images(root: Path, with_slides: bool = True) -> list[np.ndarray]:
    """Every training-side H&E image, plus the training slides at three scales."""
    return [image for _, _, image in training_sources(root, with_slides)]


def validation_tiles(root: Path, size: int = 256, per_image: int = 8) -> np.ndarray:
    """Deterministic tissue-rich tiles (N, 3, size, size) from the validation images."""
    tiles = []
    for rel in VALIDATION_FILES:
        path = root / rel
        if not path.exists() or path.suffix == ".svs":
            continue
        image = read_image(path)
        if min(image.shape[:2]) < size:
            continue
        candidates = [
            image[y : y + size, x : x + size]
            for y in range(0, image.shape[0] - size + 1, size)
            for x in range(0, image.shape[1] - size + 1, size)
        ]
        # most tissue first: glass-only tiles say nothing about rate-distortion
        candidates.sort(key=lambda t: float(t.mean()))
        tiles.extend(t.transpose(2, 0, 1) for t in candidates[:per_image])
    return np.ascontiguousarray(np.stack(tiles))
