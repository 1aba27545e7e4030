"""PNG grids and latent previews."""

import numpy as np
import pytest
from PIL import Image

from at1_jax.decode import images


def test_grid_places_each_image_and_round_trips_through_png(tmp_path):
    imgs = np.zeros((5, 4, 6, 3), np.uint8)
    for i in range(5):
        imgs[i] = 40 * i
    g = images.grid(imgs, ncols=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    np.testing.assert_array_equal(g[1 + 5 : 1 + 5 + 4, 1 + 7 : 1 + 7 + 6], imgs[4])
    assert (g[0] == 255).all()  # padding is white
    assert (g[6:10, 15:21] == 255).all()  # the empty sixth cell too
    path = images.save_png(g, str(tmp_path / "sub" / "grid.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), g)


def test_float_images_are_clipped_and_rounded():
    out = images.to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])


def test_latent_preview_scales_each_channel_to_unit_range():
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(2, 4, 8, 8)) * np.array([1, 10, 100, 1000])[None, :, None, None]
    prev = images.latents_to_images(lat)
    assert prev.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(prev.min(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(prev.max(axis=(0, 1, 2)), 1.0, atol=1e-6)


def _dark_rows(page: np.ndarray, x0: int, x1: int, y0: int) -> int:
    """How many pixel rows below y0 (between x0 and x1) hold dark text."""
    return int((page[y0:, x0:x1].min(axis=(1, 2)) < 100).sum())


def test_sheet_upscales_small_images_nearest_and_labels_each_one():
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    imgs[:, :4] = 200  # top half light, bottom half black
    imgs[1, :, :, 0] = 255
    pages = images.sheet(imgs, ["a red square\nseed 1 · guidance 5", "b", "c"], "run · step 7")
    assert len(pages) == 1
    page = pages[0]
    scale = images.SHEET_MIN_CELL // 8  # 16× nearest neighbour: exact blocks, no blur
    x, y = 8, 30  # first cell's corner (pad, title band)
    cell = page[y : y + 8 * scale, x : x + 8 * scale]
    np.testing.assert_array_equal(cell, np.repeat(np.repeat(imgs[0], scale, 0), scale, 1))
    below = y + 8 * scale
    # two caption lines under the first image, one under the second
    assert _dark_rows(page, x, x + 128, below) > _dark_rows(page, x + 136, x + 264, below) > 0
    assert _dark_rows(page[:30], 0, page.shape[1], 0) > 0  # the title line


def test_a_title_wider_than_the_sheet_wraps_instead_of_being_cut():
    imgs = np.full((1, 8, 8, 3), 40, np.uint8)
    title = "/a/long/run/folder/without/spaces/outputs/demo/run · dpmpp2m 20 steps · guidance 2"
    [short] = images.sheet(imgs, ["p"], "t")
    [page] = images.sheet(imgs, ["p"], title)
    extra = page.shape[0] - short.shape[0]  # one sheet column is 144 px wide: several lines
    assert extra >= 2 * images.TITLE_LINE_H and extra % images.TITLE_LINE_H == 0
    top = 10 + images.TITLE_LINE_H * (1 + extra // images.TITLE_LINE_H)  # the cell moved down
    assert (page[top : top + 128, 8 : 8 + 128] == 40).all()
    assert _dark_rows(page[: top - 4], 0, page.shape[1], 0) > 2 * 12  # every title line drawn


def test_sheet_pages_instead_of_cutting():
    imgs = np.full((7, 16, 16, 3), 90, np.uint8)
    pages = images.sheet(imgs, [f"prompt {i}" for i in range(7)], "t", ncols=2, per_page=3)
    assert len(pages) == 3  # 3 + 3 + 1: every image shown
    assert pages[0].shape[0] > pages[2].shape[0]  # the last page has one row
    with pytest.raises(ValueError, match="7 images but 6 captions"):
        images.sheet(imgs, ["x"] * 6, "t")
