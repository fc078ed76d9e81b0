"""``--codec`` names -> Zarr codec configurations, through the codec registries only.

The converter never imports a codec implementation: dlwsi is found by Zarr (v3) and
numcodecs (v2) through its entry points; the baselines come from ``imagecodecs.numcodecs``,
wrapped for Zarr v3 as ``numcodecs.imagecodecs_*`` array-to-bytes codecs
(``image_codecs.py``), which the package declares as entry points too: a reader of any
store needs nothing but the installed package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import ConvertError


@dataclass(frozen=True)
class CodecChoice:
    """One ``--codec`` choice."""

    name: str
    numcodecs_id: str  # the id in the numcodecs registry
    quality_key: str | None  # the codec's own name for the quality parameter
    default_quality: int | None  # None: the codec's default
    channels_last: bool  # the codec wants (H, W, 3) chunks, so v3 adds a transpose filter
    note: str
    settings: tuple[tuple[str, Any], ...] = ()  # fixed encoder settings stored with the codec
    #: lowest and highest quality --target-ssim may choose; None: the rungs the codec
    #: accepts, asked of the registry (dlwsi's depend on the installed model)
    quality_range: tuple[int, int] | None = None
    #: the --target-ssim used when no quality is given (None: the codec's fixed default)
    default_target_ssim: float | None = None
    #: the codec's own options (dlwsi: per-chunk rate control, latent refinement)
    chunk_ssim: bool = False
    refine: bool = False
    #: the name of its Zarr 3 serializer (None: imagecodecs' numcodecs wrapper)
    zarr3_name: str | None = None
    #: whether its chunks carry a checksum of their own (else crc32c follows it)
    checksummed: bool = False


#: dlwsi's default: the slide gets the lowest rung whose level-0 tissue SSIM vs the
#: source, as ``verify`` measures it, reaches this (``calibrate.py``). 0.95: the seed
#: paper's bar.
DEFAULT_TARGET_SSIM = 0.95

CODECS: dict[str, CodecChoice] = {
    c.name: c
    for c in (
        CodecChoice("dlwsi", "dlwsi", "quality", None, False,
                    "learned codec; by default the slide gets the lowest quality rung whose "
                    f"level-0 tissue SSIM reaches {DEFAULT_TARGET_SSIM}",
                    default_target_ssim=DEFAULT_TARGET_SSIM, chunk_ssim=True, refine=True,
                    zarr3_name="dlwsi", checksummed=True),
        CodecChoice("jpeg", "imagecodecs_jpeg", "level", 90, True, "JPEG, quality 1-100",
                    quality_range=(1, 100)),
        # imagecodecs' numcodecs wrapper is lossless unless told otherwise, whatever the level
        CodecChoice("jpegxl", "imagecodecs_jpegxl", "level", 90, True,
                    "JPEG XL, quality 0-100", (("lossless", False), ("effort", 7)),
                    quality_range=(1, 99)),
        CodecChoice("jpeg2k", "imagecodecs_jpeg2k", "level", 45, True,
                    "JPEG 2000, target PSNR in dB", quality_range=(20, 70)),
        # libavif's default speed is its slowest (about 0.03 MP/s on a CPU core); 6 is the
        # setting the rate-distortion benchmark uses and common in practice
        CodecChoice("avif", "imagecodecs_avif", "level", 90, True, "AVIF, quality 0-100",
                    (("speed", 6),), quality_range=(1, 99)),
    )
}


def codec_choice(name: str) -> CodecChoice:
    try:
        return CODECS[name]
    except KeyError:
        raise ConvertError(f"unknown codec {name!r}; choose one of: "
                           f"{', '.join(CODECS)}") from None


def _params(choice: CodecChoice, quality: int | None, chunk_ssim: float | None = None,
            refine: int = 0) -> dict[str, Any]:
    q = choice.default_quality if quality is None else quality
    params = dict(choice.settings)
    if q is not None and choice.quality_key is not None:
        params[choice.quality_key] = int(q)
    if chunk_ssim is not None:
        if not choice.chunk_ssim:
            raise ConvertError(f"--chunk-ssim is dlwsi's per-chunk rate control; --codec "
                               f"{choice.name} takes --quality or --target-ssim")
        params["target_ssim"] = float(chunk_ssim)
    if refine:
        if not choice.refine:
            raise ConvertError(f"--refine is dlwsi's latent refinement; --codec "
                               f"{choice.name} has no such setting")
        params["refine"] = int(refine)
    return params


def image_codec(choice: CodecChoice, quality: int, refine: int = 0) -> Any:
    """The numcodecs codec for ``choice`` at ``quality`` (with dlwsi's ``refine`` steps),
    from the registry. It takes (H, W, 3) chunks when ``choice.channels_last``, else
    (3, H, W)."""
    import numcodecs

    register_image_codecs()
    return numcodecs.get_codec({"id": choice.numcodecs_id,
                                **_params(choice, quality, refine=refine)})


def quality_range(choice: CodecChoice) -> tuple[int, int]:
    """The qualities ``choice`` accepts, lowest to highest: from the table, or asked of
    the codec itself (dlwsi: the rungs of its model)."""
    if choice.quality_range is not None:
        return choice.quality_range
    import numcodecs

    register_image_codecs()
    try:
        return tuple(numcodecs.get_codec({"id": choice.numcodecs_id,
                                          **dict(choice.settings)}).quality_range())
    except Exception as exc:  # noqa: BLE001 - the codec's own message says why
        raise ConvertError(f"codec {choice.name}: {exc}") from None


def v3_codecs(choice: CodecChoice, quality: int | None, chunk_ssim: float | None = None,
              refine: int = 0) -> dict[str, Any]:
    """``filters``/``serializer``/``compressors`` for a Zarr v3 (3, H, W) uint8 array."""
    register_image_codecs()
    params = _params(choice, quality, chunk_ssim, refine)
    serializer: dict[str, Any] = {"name": choice.zarr3_name
                                  or f"numcodecs.{choice.numcodecs_id}"}
    if params or choice.zarr3_name is None:
        serializer["configuration"] = params
    return {
        "filters": [{"name": "transpose", "configuration": {"order": [1, 2, 0]}}]
        if choice.channels_last else None,
        "serializer": serializer,
        # a chunk without a checksum of its own would, damaged, decode to wrong pixels
        # or fail deep inside its library: crc32c makes the damage a clear error
        "compressors": None if choice.checksummed else [{"name": "crc32c"}],
    }


def v2_compressor(choice: CodecChoice, quality: int | None, chunk_ssim: float | None = None,
                  refine: int = 0) -> dict[str, Any]:
    """The numcodecs ``compressor`` for a Zarr v2 array (NGFF 0.4)."""
    if choice.channels_last:
        # Zarr v2 has no transpose filter: an image codec would see (3, H, W) chunks as
        # a 3-row image. Only a codec of channel-first chunks (dlwsi) works there.
        raise ConvertError(f"--codec {choice.name} needs --ngff 0.5 (Zarr v2 cannot hand it "
                           "channel-last chunks); use --codec dlwsi with --ngff 0.4")
    return {"id": choice.numcodecs_id, **_params(choice, quality, chunk_ssim, refine)}


#: The filter that snaps a lossy copy of a JPEG-sourced level back onto the source's
#: JPEG lattice when it is read (numcodecs-dlwsi's, found through the registries).
JPEG_LATTICE_ID = "dlwsi_jpeg_lattice"


def jpeg_lattice_codec(lattice: dict[str, Any]) -> Any:
    """The lattice filter as a numcodecs codec, from the registry."""
    import numcodecs

    return numcodecs.get_codec({"id": JPEG_LATTICE_ID, **lattice})


def with_jpeg_lattice(codecs: dict[str, Any], lattice: dict[str, Any] | None,
                      zarr_format: int) -> dict[str, Any]:
    """``codecs`` with the lattice filter first (level 0 of a JPEG-sourced slide): it
    sees (3, H, W) chunks, before any transpose a channel-last codec needs."""
    if lattice is None:
        return codecs
    if zarr_format == 3:
        first = {"name": JPEG_LATTICE_ID, "configuration": lattice}
        return {**codecs, "filters": [first, *(codecs.get("filters") or [])]}
    return {**codecs, "filters": [jpeg_lattice_codec(lattice)]}


_REGISTERED = False


def register_image_codecs() -> None:
    """Make imagecodecs' codecs known to numcodecs and Zarr 3 in this process (idempotent).
    The package's entry points do the same for any process; this covers a source tree
    run without installing."""
    global _REGISTERED
    if _REGISTERED:
        return
    import imagecodecs.numcodecs
    from zarr.registry import register_codec

    from .image_codecs import CLASSES

    imagecodecs.numcodecs.register_codecs(verbose=False)
    for name, cls in CLASSES.items():
        register_codec(name, cls)
    _REGISTERED = True


def describe_v3(codecs: list[dict[str, Any]]) -> str:
    """A short text for the codec chain in v3 array metadata (sharding unwrapped)."""
    parts = []
    for codec in codecs:
        name = codec.get("name", "?")
        config = codec.get("configuration", {}) or {}
        if name == "sharding_indexed":
            inner = describe_v3(config.get("codecs", []))
            parts.append(f"sharding{tuple(config.get('chunk_shape', []))}[{inner}]")
        elif name in ("bytes", "transpose", "crc32c"):
            continue
        else:
            shown = {k: v for k, v in config.items() if k in ("quality", "level", "model",
                                                                  "target_ssim", "refine",
                                                                  "color")}
            parts.append(f"{name}{shown if shown else ''}")
    return " + ".join(parts) or "none"
