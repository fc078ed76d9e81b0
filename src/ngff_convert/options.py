"""The settings of a conversion (and of ``verify``/``check``), as the CLI hands them over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .tissue import Glass, MaskParams


@dataclass
class Options:
    codec: str = "dlwsi"
    quality: int | None = None
    target_ssim: float | None = None  # the slide's quality chosen to reach this (calibrate)
    chunk_ssim: float | None = None  # dlwsi: each chunk's rung chosen to reach this SSIM
    refine: int = 0  # dlwsi: latent refinement steps per chunk (slower encoding, fewer bytes)
    model: str | None = None  # dlwsi: the model id (None: the installed default)
    ngff: str = "0.5"
    glass: Glass = Glass.fill
    chunk: int = 512
    shard: int = 4  # chunks per shard side (NGFF 0.5); 1 = no sharding
    associated: bool = False
    level0: str = "auto"  # auto | transcode | lossy (transcode.py)
    keep_properties: bool = False  # identifying properties and the file name kept
    jpeg_lattice: bool = True  # level 0 of a JPEG slide gets the lattice filter (jpeg_source)
    mask: MaskParams = field(default_factory=MaskParams)
    mask_out: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec, for URLs
