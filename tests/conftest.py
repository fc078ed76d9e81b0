"""Shared fixtures: real H&E data from ../shared/data, skipped cleanly when absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "he").is_dir():
        pytest.skip(f"real H&E data not found at {DATA} (the shared data folder beside the "
                    "repository); these tests need it")
    return DATA


def read_rgb(path: Path) -> np.ndarray:
    from numcodecs_dlwsi.train.data import read_image

    return read_image(path)


@pytest.fixture(scope="session")
def slides() -> Path:
    """``../shared/data/slides``: the real whole-slide files."""
    if not (DATA / "slides").is_dir():
        pytest.skip(f"real slides not found at {DATA / 'slides'} (the shared data folder "
                    "beside the repository); these tests need them")
    return DATA / "slides"


@pytest.fixture(scope="session")
def he_image(data_root: Path) -> np.ndarray:
    """A real 1000x1000 H&E field (held-out MoNuSeg image), uint8 (H, W, 3)."""
    return read_rgb(data_root / "he/monuseg_nc/TCGA-21-5786-01Z-00-DX1.png")


@pytest.fixture(scope="session")
def he_tile(he_image: np.ndarray) -> np.ndarray:
    """A 512x512 tissue tile, uint8 (3, 512, 512)."""
    return np.ascontiguousarray(he_image[200:712, 300:812].transpose(2, 0, 1))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))
