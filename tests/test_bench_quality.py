"""``compact-hooks bench quality`` on 2 spawned gloo ranks of the trained model (few steps: the full
20-step run is the documented benchmark, not a test)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

import torch  # noqa: E402

from compact_hooks.bench import quality  # noqa: E402

FIELDS = {"name", "psnr_db", "ssim", "lpips_or_null", "wire_bytes_per_image", "ratio"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return quality.run(steps=4, seeds=(0,), classes=(3, 8), out=out,
                       methods=["naive int2", "compact int2", "compact int4"]), out


def test_rows_have_the_documented_fields(result):
    r, _ = result
    assert [m["name"] for m in r["methods"]] == ["uncompressed", "naive int2", "compact int2", "compact int4"]
    assert r["world_size"] == 2 and r["steps"] == 4 and r["images_per_method"] == 2
    for m in r["methods"]:
        assert FIELDS <= set(m) and m["lpips_or_null"] is None
    assert "LPIPS" in r["lpips"] or "lpips" in r["lpips"]


def test_reference_is_exact_and_compression_costs_bytes_and_quality(result):
    r, _ = result
    by = {m["name"]: m for m in r["methods"]}
    ref = by["uncompressed"]
    assert ref["psnr_db"] is None and ref["ssim"] == pytest.approx(1.0) and ref["ratio"] == 1.0
    for name in ("naive int2", "compact int2", "compact int4"):
        m = by[name]
        assert m["wire_bytes_per_image"] < ref["wire_bytes_per_image"] and m["ratio"] > 1.5
        assert m["psnr_db"] is not None and 15 < m["psnr_db"] < 120 and 0 < m["ssim"] < 1
    assert by["compact int4"]["psnr_db"] > by["compact int2"]["psnr_db"]
    # the same bytes: a residual against the shared reconstruction beats compressing the activation itself
    assert by["compact int2"]["wire_bytes_per_image"] == by["naive int2"]["wire_bytes_per_image"]
    assert by["compact int2"]["psnr_db"] > by["naive int2"]["psnr_db"] + 3
    assert by["compact int4"]["wire_bytes_per_image"] > by["compact int2"]["wire_bytes_per_image"]


def test_writes_the_grid_and_json(result):
    from PIL import Image

    r, out = result
    with Image.open(out / "quality.png") as img:
        assert img.size == (120 + 2 * (16 * 4 + 2), 4 * (16 * 4 + 2))  # labels, 2 classes x (reference + 3 methods)
    assert json.loads((out / "quality.json").read_text())["methods"][0]["name"] == "uncompressed"


def test_metrics():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert quality.psnr_db(x, x) is None and quality.ssim(x, x) == pytest.approx(1.0)
    noisy = (x + 0.1).clamp(0, 1)
    assert 15 < quality.psnr_db(noisy, x) < 25 and quality.ssim(noisy, x) < 1.0


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="int3"):
        quality.run(methods=["compact int3"])
