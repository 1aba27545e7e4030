"""Bad and unusual images: each is skipped with its reason or repaired to 8-bit RGB."""

import io

import numpy as np
import pytest
from fixtures_images import huge_png_header, png_bytes, random_rgb
from PIL import Image

from data_prep import images


def _encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _skip_reason(data, **kw):
    with pytest.raises(images.ImageSkip) as e:
        images.decode_image(data, **kw)
    return e.value.reason


def test_zero_byte_corrupt_and_truncated():
    jpeg = _encode(Image.fromarray(random_rgb(64, 64, 0)), "JPEG", quality=90)
    assert _skip_reason(b"") == "empty_image"
    assert _skip_reason(b"this is not an image at all") == "corrupt_image"
    assert _skip_reason(jpeg[: len(jpeg) // 2]) == "truncated_image"
    png = png_bytes(Image.fromarray(random_rgb(64, 64, 1)))
    assert _skip_reason(png[: len(png) // 2]) in ("truncated_image", "corrupt_image")


def test_too_small_and_decompression_bomb():
    small = png_bytes(Image.fromarray(random_rgb(20, 50, 2)))
    assert _skip_reason(small, min_size=32) == "too_small"
    assert images.decode_image(small, min_size=20).original_size == (50, 20)
    # Header claims 100k x 100k: refused before any pixel is decoded, by Pillow's or our limit.
    assert _skip_reason(huge_png_header(100_000, 100_000)) == "too_large"
    assert _skip_reason(huge_png_header(3000, 3000), max_pixels=1_000_000) == "too_large"


def test_rgb_is_unchanged():
    a = random_rgb(30, 40, 3)
    d = images.decode_image(png_bytes(Image.fromarray(a)))
    assert d.repair is None and d.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(d.image), a)


def test_grayscale_palette_cmyk_to_rgb():
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    d = images.decode_image(png_bytes(Image.fromarray(gray)))
    assert d.repair == "mode_l" and d.original_mode == "L"
    np.testing.assert_array_equal(np.asarray(d.image), np.repeat(gray[..., None], 3, axis=2))

    rgb = Image.fromarray(random_rgb(32, 32, 4))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    d = images.decode_image(png_bytes(pal))
    assert d.repair == "mode_p"
    np.testing.assert_array_equal(np.asarray(d.image), np.asarray(pal.convert("RGB")))

    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    d = images.decode_image(_encode(cmyk, "JPEG", quality=100))
    assert d.repair == "mode_cmyk" and d.image.mode == "RGB"
    r, g, b = np.asarray(d.image).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_alpha_goes_onto_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 255  # left half opaque red, right half transparent
    d = images.decode_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    a = np.asarray(d.image)
    assert d.repair == "mode_alpha"
    np.testing.assert_array_equal(a[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(a[0, 31], [255, 255, 255])

    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30])
    pal.info["transparency"] = 0
    d = images.decode_image(png_bytes(pal))
    np.testing.assert_array_equal(np.asarray(d.image)[0, 0], [10, 20, 30])


def test_16bit_grayscale_scaled_to_8bit():
    a16 = np.full((32, 32), 65535, np.uint16)
    a16[:, :16] = 257 * 100
    d = images.decode_image(png_bytes(Image.fromarray(a16)))
    a = np.asarray(d.image)
    assert d.repair == "mode_16bit" and a.dtype == np.uint8
    np.testing.assert_array_equal(a[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(a[0, 31], [255, 255, 255])
    d = images.from_array(a16)
    np.testing.assert_array_equal(np.asarray(d.image)[0, 0], [100, 100, 100])


def test_resize_center_crop_and_model_input():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # a white band exactly in the center half of a 2:1 image
    out = images.resize_center_crop(Image.fromarray(a), 16)
    assert out.size == (16, 16)
    # Short side 40 -> 16 (scale 0.4): width 32, crop x 8..24 = original 20..60 (all white).
    assert np.asarray(out)[:, 2:14].min() > 240
    x = images.to_model_input(out)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert x.max() == 1.0 and x.min() >= -1.0


def test_exif_rotation_applied():
    a = random_rgb(20, 40, 5)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    d = images.decode_image(_encode(img, "PNG", exif=exif.tobytes()))
    assert d.image.size == (20, 40)


def _tiff(a, mode):
    return _encode(Image.fromarray(a, mode), "TIFF")


def test_float_and_int32_images_scaled_by_their_range():
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    d = images.decode_image(_tiff(ramp, "F"))  # 0..1 floats: 1.0 is white
    assert d.repair == "mode_float" and d.original_mode == "F"
    np.testing.assert_array_equal(np.asarray(d.image)[..., 1], np.round(ramp * 255))
    # 0..1000 (10-bit data): scaled by 1023, the smallest bit depth that holds the maximum.
    tenbit = np.round(ramp * 1000)
    cases = ((tenbit, "F", "mode_float"), (tenbit.astype(np.int32), "I", "mode_int32"))
    for a, mode, repair in cases:
        d = images.decode_image(_tiff(a, mode))
        assert d.repair == repair
        np.testing.assert_array_equal(np.asarray(d.image)[..., 0], np.round(tenbit / 1023 * 255))
    assert np.asarray(d.image).max() == 249  # 1000 / 1023, not the 4 of a 16-bit reading
    d = images.decode_image(_tiff(np.full((32, 32), 200, np.int32), "I"))  # 8-bit data in I
    np.testing.assert_array_equal(np.asarray(d.image)[0, 0], [200, 200, 200])


def test_nonfinite_and_negative_pixels_are_skipped():
    nan = np.full((32, 32), np.nan, np.float32)
    assert _skip_reason(_tiff(nan, "F")) == "nonfinite_image"
    some = np.ones((32, 32), np.float32)
    some[3, 4] = np.inf
    assert _skip_reason(_tiff(some, "F")) == "nonfinite_image"
    assert _skip_reason(_tiff(some - 2, "F")) == "nonfinite_image"
    signed = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert _skip_reason(_tiff(signed, "F")) == "unsupported_pixel_values"
    with pytest.raises(images.ImageSkip, match="nonfinite_image"):
        images.from_array(np.full((32, 32, 3), np.nan, np.float32))


def test_float_arrays_from_tfds():
    a = np.zeros((32, 32, 3), np.float32)
    a[..., 0], a[..., 2] = 1.0, 0.5
    d = images.from_array(a)
    assert d.repair == "mode_float" and d.original_mode == "float32"
    np.testing.assert_array_equal(np.asarray(d.image)[0, 0], [255, 0, 128])
    d = images.from_array((a * 65535).astype(np.uint16))  # 16-bit RGB, no Pillow mode for it
    assert d.repair == "mode_16bit"
    np.testing.assert_array_equal(np.asarray(d.image)[0, 0], [255, 0, 127])  # 32767/65535
