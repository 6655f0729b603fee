"""Every PIL mode becomes the right 8-bit RGB (envs/vlm/crops.py load_image / to_rgb), and oversized images
are clear errors - in a sweep over a manifest, a failed row with its reason."""

import json

import numpy as np
import pytest
from PIL import Image

from envs.vlm import crops
from envs.vlm.crops import load_image, to_rgb
from envs.vlm.errors import InputError

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)  # the 8-bit arrays every test image is built from
GREY = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def _grey3(g):
    return np.repeat(g[..., None], 3, axis=2)


def _on_white(colour, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return colour.astype(np.float64) * a + 255 * (1 - a)


def _palette_image():
    img = Image.fromarray(INDEX, "P")
    img.putpalette(PALETTE.reshape(-1).tolist())
    return img


def _cases():
    g16 = GREY.astype(np.uint16) * 257
    yield "L", Image.fromarray(GREY, "L"), _grey3(GREY)
    yield "1", Image.fromarray(GREY > 127).convert("1"), _grey3(np.where(GREY > 127, 255, 0))
    yield "I;16", Image.frombytes("I;16", (17, 12), g16.astype("<u2").tobytes()), _grey3(GREY)
    yield "I;16B", Image.frombytes("I;16B", (17, 12), g16.astype(">u2").tobytes()), _grey3(GREY)
    yield "I", Image.frombytes("I", (17, 12), g16.astype(np.int32).tobytes()), _grey3(GREY)
    yield "F [0, 1]", Image.fromarray(GREY.astype(np.float32) / 255, "F"), _grey3(GREY)
    yield "F [0, 255]", Image.fromarray(GREY.astype(np.float32), "F"), _grey3(GREY)
    yield "P", _palette_image(), PALETTE[INDEX]
    transparent = _palette_image()
    transparent.info["transparency"] = 5  # palette entry 5 is see-through: white
    yield "P + transparency", transparent, np.where((INDEX == 5)[..., None], 255, PALETTE[INDEX])
    yield "LA", Image.fromarray(np.stack([GREY, ALPHA], 2), "LA"), _on_white(_grey3(GREY), ALPHA)
    yield "RGBA", Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), _on_white(RGB, ALPHA)
    opaque = np.full_like(ALPHA, 255)
    yield "RGBA opaque", Image.fromarray(np.dstack([RGB, opaque]), "RGBA"), RGB
    yield "CMYK", Image.fromarray(RGB, "RGB").convert("CMYK"), RGB
    yield "RGB", Image.fromarray(RGB, "RGB"), RGB


CASES = list(_cases())


@pytest.mark.parametrize("name,img,want", CASES, ids=[c[0] for c in CASES])
def test_every_mode_becomes_its_8_bit_rgb(name, img, want):
    assert img.mode == name.split(" ")[0]
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (17, 12)
    got = np.asarray(out).astype(np.int64)
    assert np.abs(got - np.rint(want).astype(np.int64)).max() <= 1


@pytest.mark.parametrize("mode,suffix", [("I;16", "png"), ("I", "tif")])
def test_a_16_bit_file_on_disk_is_not_white(tmp_path, mode, suffix):
    path = tmp_path / f"grey16.{suffix}"
    g16 = (GREY.astype(np.uint16) * 257).astype(np.int32 if mode == "I" else "<u2")
    img = Image.frombytes(mode, (17, 12), g16.tobytes())
    img.save(path)
    with Image.open(path) as back:
        assert back.mode in ("I;16", "I")  # 16 bits on disk
    got = np.asarray(load_image(path)).astype(np.int64)
    assert np.abs(got - _grey3(GREY)).max() <= 1
    assert got.max() < 255 or GREY.max() == 255


def test_float_images_out_of_range_are_clipped_and_nan_is_black():
    a = np.array([[-5.0, 0.5, np.nan, 300.0]], np.float32)
    got = np.asarray(to_rgb(Image.fromarray(a, "F")))[..., 0]
    assert got.tolist() == [[0, 0, 0, 255]]  # max > 1: read as [0, 255]
    b = np.array([[0.0, 0.5, 1.0, -1.0]], np.float32)
    assert np.asarray(to_rgb(Image.fromarray(b, "F")))[..., 0].tolist() == [[0, 128, 255, 0]]


def test_an_rgb_image_is_returned_as_a_copy():
    img = Image.fromarray(RGB, "RGB")
    out = load_image(img)
    assert out is not img
    np.testing.assert_array_equal(np.asarray(out), RGB)


def test_an_image_over_the_size_limit_is_an_error_naming_it_and_its_size(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.fromarray(RGB).save(path)
    with pytest.raises(InputError, match=r"wide\.png is 17 x 12 = 0\.0 megapixels, over the limit"):
        load_image(path, max_pixels=100)
    monkeypatch.setattr(crops, "MAX_PIXELS", 100)
    with pytest.raises(InputError, match="over the limit of 0.0001"):
        load_image(path)
    with pytest.raises(InputError, match="the image array is 17 x 12"):
        load_image(RGB)
    assert load_image(path, max_pixels=17 * 12).size == (17, 12)  # the limit itself is allowed


def _bomb(path):
    Image.new("1", (14000, 14000)).save(path)  # 196 megapixels, a few hundred kB on disk
    return path


def test_a_decompression_bomb_is_an_error_naming_the_file(tmp_path):
    path = _bomb(tmp_path / "huge.png")
    with pytest.raises(InputError, match=r"huge\.png (is too large to read|is 14000 x 14000)"):
        load_image(path)


def test_in_a_sweep_an_oversized_image_is_a_failed_row_with_its_reason(tiny, vlm_dir, tmp_path, monkeypatch):
    from envs.outcomes import OutcomeTable, build_outcomes, read_rows
    from envs.vlm.evaluate import all_configs
    from tests.conftest import fake_latency

    Image.fromarray(RGB).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    _bomb(tmp_path / "huge.png")
    rows = [{"id": name, "image": f"{name}.png", "question": "how many circles?", "answers": ["2"]}
            for name in ("ok", "big", "huge")]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(crops, "MAX_PIXELS", 1000)  # 40 x 40 is over it, 17 x 12 is not
    configs = all_configs(tiny)[:2]
    out = build_outcomes(vlm_dir, {"kind": "manifest", "path": str(manifest)}, tmp_path / "t", fake_latency(),
                         configs, progress=False)  # fmt: skip
    got = {(r["sample_id"], r["config"]): r for r in read_rows(out)}
    assert len(got) == 6
    assert all(got[("ok", j)]["status"] == "ok" for j in range(2))
    for j in range(2):
        assert got[("big", j)]["status"] == "failed"
        assert "big.png is 40 x 40" in got[("big", j)]["reason"] and "over the limit" in got[("big", j)]["reason"]
        assert got[("huge", j)]["status"] == "failed" and "huge.png" in got[("huge", j)]["reason"]
    table = OutcomeTable.load(out)
    assert table.ok.tolist() == [True, False, False]
