"""The benchmark mode runs end to end and reports every rate."""

from data_prep import bench
from data_prep.encode import main
from data_prep.settings import EncodeSettings


def test_benchmark_report(tiny_models, capsys):
    s = EncodeSettings(
        bench.SYNTHETIC,
        "unused",
        vae=tiny_models.vae,
        text_encoders=[f"clip={tiny_models.clip}", f"t5={tiny_models.t5}"],
        resolution=32,
        batch_size=4,
        progress=False,
    )
    r = bench.run(s, 8)
    assert r["images"] == 8 and r["device"] == "cpu"
    rates = [r[k] for k in ("vae_images_per_s", "text_clip_images_per_s", "text_t5_images_per_s")]
    assert all(x > 0 for x in rates)
    assert abs(r["bare_encoders_images_per_s"] - 1 / sum(1 / x for x in rates)) < 1e-6
    assert r["pipeline_fraction_of_bare"] > 0
    argv = ["synthetic", "unused", "--vae", "pixel", "--text-encoder", f"clip={tiny_models.clip}",
            "--resolution", "16", "--benchmark-images", "4", "--no-progress"]  # fmt: skip
    assert main([*argv, "--benchmark"]) == 0
    assert "pipeline_images_per_s" in capsys.readouterr().out
