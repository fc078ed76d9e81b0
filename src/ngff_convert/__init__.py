"""ngff-convert: whole-slide images to multiscale OME-Zarr, glass removed.

Modules, one concept each:

- :mod:`ngff_convert.slide`    reading slides through OpenSlide
- :mod:`ngff_convert.provenance`  what a store keeps about its source (nothing identifying)
- :mod:`ngff_convert.jpeg_source`  the JPEG lattice of a slide's level 0, from its headers
- :mod:`ngff_convert.jpeg_tiles`  level 0's JPEG tiles as the slide file stores them
- :mod:`ngff_convert.transcode`  a zero-loss level 0: those tiles, recompressed losslessly
- :mod:`ngff_convert.tissue`   the tissue mask and glass handling
- :mod:`ngff_convert.pyramid`  the dask pyramid (one task per output shard)
- :mod:`ngff_convert.calibrate`  ``--target-ssim``: the slide's quality from a sample
- :mod:`ngff_convert.fidelity` the SSIM ``verify`` and calibration share
- :mod:`ngff_convert.ngff`     OME-NGFF 0.4 / 0.5 metadata, validated
- :mod:`ngff_convert.codecs`   ``--codec`` names -> Zarr / numcodecs codec configurations
- :mod:`ngff_convert.image_codecs`  imagecodecs' codecs as Zarr 3 codecs (entry points)
- :mod:`ngff_convert.store`    output stores (paths, fsspec URLs) and array creation
- :mod:`ngff_convert.ownership`  what ``--overwrite`` may delete: only our own output
- :mod:`ngff_convert.destination`  where a conversion writes, and the rename into place
- :mod:`ngff_convert.options`  the settings of a conversion
- :mod:`ngff_convert.convert`  the conversion and its stages
- :mod:`ngff_convert.write`    writing the levels, one dask task per block
- :mod:`ngff_convert.resume`   what an interrupted conversion and ``--resume`` share
- :mod:`ngff_convert.check`    decoding every stored chunk, locating damage
- :mod:`ngff_convert.reading`  opening a converted image: ``info``, ``check``, ``extract``
- :mod:`ngff_convert.verify`   ``verify``: a converted image against its source
- :mod:`ngff_convert.cli`      the ``ngff-convert`` command
"""

from __future__ import annotations

__version__ = "0.4.0"


class ConvertError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 1."""


class ConvertInterrupted(ConvertError):
    """The user interrupted a conversion: the message says what can be resumed."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (or its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
