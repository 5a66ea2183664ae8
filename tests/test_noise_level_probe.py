"""benchmarks/noise_level_probe.py's plot (its sampling is ``sample(..., t_start=)``, tested against
the exact flow in tests/test_samplers.py)."""

from PIL import Image

from mdm_dist.viz import line_plot


def test_line_plot_writes_a_png(tmp_path):
    path = line_plot({"shape": ([0.0, 0.5, 0.9], [0.4, 0.7, 0.8]), "colour": ([0.0, 0.9], [0.9, 1.0])},
                     tmp_path / "p.png", xlabel="x", ylabel="y", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
