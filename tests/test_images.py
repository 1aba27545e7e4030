"""PNG grids and latent previews."""

import numpy as np
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
