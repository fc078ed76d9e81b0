"""Zarr v3, sharded v3 and v2 stores, read back by a process that never imports dlwsi."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

WRITE_AND_READ = textwrap.dedent("""
    import json, sys
    import numpy as np
    import zarr
    spec = json.loads(sys.argv[1])
    image = np.load(spec["image"])
    if spec["format"] == 2:
        z = zarr.create_array(spec["path"], shape=image.shape, chunks=(3, 512, 512),
                              dtype="uint8", zarr_format=2, fill_value=255,
                              compressors={"id": "dlwsi", "quality": spec["quality"]})
    else:
        z = zarr.create_array(spec["path"], shape=image.shape, chunks=spec["chunks"],
                              shards=spec["shards"], dtype="uint8", fill_value=255,
                              serializer={"name": "dlwsi",
                                          "configuration": {"quality": spec["quality"]}},
                              compressors=None)
    z[:] = image
    back = zarr.open_array(spec["path"], mode="r")[:]
    np.save(spec["out"], back)
    assert "numcodecs_dlwsi" in sys.modules  # loaded by zarr's registry, not by us
""")


def _run_isolated(tmp_path, image, **spec):
    np.save(tmp_path / "image.npy", image)
    spec.update(image=str(tmp_path / "image.npy"), out=str(tmp_path / "back.npy"))
    subprocess.run([sys.executable, "-c", WRITE_AND_READ, json.dumps(spec)], check=True)
    return np.load(tmp_path / "back.npy")


@pytest.fixture(scope="module")
def slide_region(he_image):
    """A 3 x 1000 x 1000 real H&E region with a band of glass (the fill value)."""
    image = np.ascontiguousarray(he_image.transpose(2, 0, 1)).copy()
    image[:, :, 512:] = 255
    return image


@pytest.mark.parametrize("layout", ["v3", "v3-sharded", "v2"])
def test_store_written_and_read_without_importing_dlwsi(tmp_path, slide_region, layout):
    path = str(tmp_path / "slide.zarr")
    spec = {"path": path, "quality": 2, "format": 2 if layout == "v2" else 3,
            "chunks": [3, 256, 256] if layout == "v3-sharded" else [3, 512, 512],
            "shards": [3, 512, 512] if layout == "v3-sharded" else None}
    back = _run_isolated(tmp_path, slide_region, **spec)
    assert back.shape == slide_region.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - slide_region.astype(int))
    assert err[:, :, :512].mean() < 8
    # glass chunks equal the fill value: zarr writes nothing for them and reads 255 back
    assert (back[:, :, 512:] == 255).all()
    glass_chunk = {"v3": "c/0/0/1", "v2": "0.0.1"}.get(layout)
    if glass_chunk:
        assert not (tmp_path / "slide.zarr" / glass_chunk).exists()
    # read again in this process through the normal zarr API
    again = zarr.open_array(path, mode="r")[:]
    np.testing.assert_array_equal(again, back)


def test_v3_metadata_pins_model(tmp_path, slide_region):
    path = tmp_path / "a.zarr"
    _run_isolated(tmp_path, slide_region, path=str(path), quality=2, format=3,
                  chunks=[3, 512, 512], shards=None)
    codec = json.loads((path / "zarr.json").read_text())["codecs"][0]
    assert codec["name"] == "dlwsi"
    assert set(codec["configuration"]) == {"quality", "model", "model_hash"}
    assert (path / "c" / "0" / "0" / "0").exists()


def test_v3_rejects_unsuitable_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        zarr.create_array(tmp_path / "f.zarr", shape=(3, 64, 64), chunks=(3, 64, 64),
                          dtype="float32", serializer={"name": "dlwsi"}, compressors=None)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        zarr.create_array(tmp_path / "g.zarr", shape=(4, 64, 64), chunks=(4, 64, 64),
                          dtype="uint8", serializer={"name": "dlwsi"}, compressors=None)


def test_zarr_decodes_many_chunks_in_one_batch(tmp_path, slide_region, monkeypatch):
    from numcodecs_dlwsi import runtime

    z = zarr.create_array(tmp_path / "b.zarr", shape=slide_region.shape, chunks=(3, 256, 256),
                          dtype="uint8", fill_value=255, compressors=None,
                          serializer={"name": "dlwsi", "configuration": {"quality": 2}})
    z[:] = slide_region
    calls = []
    synthesis = runtime.synthesis

    def counting(ref, y_hat):
        calls.append(y_hat.shape[0])
        return synthesis(ref, y_hat)

    monkeypatch.setattr(runtime, "synthesis", counting)
    # zarr hands a codec one chunk per call unless its pipeline batch size is raised
    with zarr.config.set({"codec_pipeline.batch_size": 16}):
        region = zarr.open_array(tmp_path / "b.zarr", mode="r")[:, :512, :512]
    assert region.shape == (3, 512, 512)
    assert calls == [4]  # four 256x256 tissue chunks, one synthesis call
