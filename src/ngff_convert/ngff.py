"""OME-NGFF metadata for an RGB whole-slide image: small functions, validated.

Modelled on ome-zarr-py's ``writer.py``: each function builds one part of the
metadata; :func:`image_attrs` assembles them and validates the result with
``ome-zarr-models`` before anything is written.
"""

from __future__ import annotations

from typing import Any

import pydantic

from . import ConvertError

VERSIONS = ("0.4", "0.5")
CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


def axes(unit: str | None) -> list[dict[str, str]]:
    """Axes (c, y, x); y and x carry ``unit`` when the pixel size is known."""
    space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in "yx"]
    return [{"name": "c", "type": "channel"}, *space]


def level_scale(level: int, pixel_size: tuple[float, float] | None) -> list[float]:
    """Scale of pyramid level ``level`` (factor 2 per level), (c, y, x)."""
    py, px = pixel_size or (1.0, 1.0)
    f = float(2**level)
    return [1.0, py * f, px * f]


def datasets(paths: list[str], pixel_size: tuple[float, float] | None) -> list[dict[str, Any]]:
    return [{"path": p, "coordinateTransformations": [
        {"type": "scale", "scale": level_scale(i, pixel_size)}]} for i, p in enumerate(paths)]


def multiscale(paths: list[str], pixel_size: tuple[float, float] | None, name: str,
               version: str) -> dict[str, Any]:
    """One ``multiscales`` entry; ``pixel_size`` is (y, x) in micrometres, or None."""
    _check_version(version)
    entry: dict[str, Any] = {
        "name": name,
        "axes": axes("micrometer" if pixel_size else None),
        "datasets": datasets(paths, pixel_size),
        "type": "mean",
        "metadata": {"method": "2x2 mean", "description": "ngff-convert pyramid"},
    }
    if version == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def omero_rgb(name: str, version: str) -> dict[str, Any]:
    """``omero`` rendering settings that show the three channels as RGB, window 0-255."""
    _check_version(version)
    channels = [{
        "label": label, "color": colour, "active": True, "coefficient": 1.0,
        "family": "linear", "inverted": False,
        "window": {"start": 0, "end": 255, "min": 0, "max": 255},
    } for label, colour in CHANNELS]
    out: dict[str, Any] = {"name": name, "channels": channels,
                           "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0}}
    if version == "0.4":
        out["version"] = "0.4"
    return out


def image_attrs(multiscale_entry: dict[str, Any], omero: dict[str, Any], version: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image group's attributes for ``version``, validated; ``extra`` is kept beside."""
    _check_version(version)
    if version == "0.5":
        attrs: dict[str, Any] = {"ome": {"version": "0.5", "multiscales": [multiscale_entry],
                                         "omero": omero}}
    else:
        attrs = {"multiscales": [multiscale_entry], "omero": omero}
    validate(attrs, version)
    return {**attrs, **(extra or {})}


def validate(attrs: dict[str, Any], version: str) -> None:
    """Validate image-group attributes with ome-zarr-models; ConvertError if invalid."""
    if version == "0.5":
        from ome_zarr_models.v05.image import ImageAttrs

        payload = {k: v for k, v in attrs["ome"].items() if k != "omero"}
    else:
        from ome_zarr_models.v04.image import ImageAttrs

        payload = attrs
    try:
        ImageAttrs.model_validate(payload)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ConvertError(f"invalid NGFF {version} metadata at {where}: {first['msg']}") from None


def read_multiscale(attrs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(version, first multiscales entry) of an image group's attributes, or None."""
    if "ome" in attrs and attrs["ome"].get("multiscales"):
        return str(attrs["ome"].get("version", "0.5")), attrs["ome"]["multiscales"][0]
    if attrs.get("multiscales"):
        entry = attrs["multiscales"][0]
        return str(entry.get("version", "0.4")), entry
    return None


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ConvertError(f"unsupported NGFF version {version!r}; choose 0.4 or 0.5")
