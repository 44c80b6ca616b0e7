"""Tests of the explain tool: attention maps, exemplar selection, rendering and the command line.

The command-line tests train configs/tiny.py once per session on the flowers12 images (ViT-Ti at
32 px, a 2x2 token grid) and render real images with it. The two-scale token layout of CNN
backbones is tested on a randomly initialised EfficientNet-Lite0 at 64 px (4x4 + 2x2 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aqhash_jax import bit_stats, explain
from aqhash_jax import explain_plots as plots
from aqhash_jax.models.hashing import build_model
from aqhash_jax.retrieval.export import load_codes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AQHASH_SHARED_DATA", REPO.parent / "shared" / "data"))
FLOWERS = SHARED_DATA / "flowers12"

needs_flowers = pytest.mark.skipif(
    not FLOWERS.is_dir(), reason=f"flowers12 image folder not found at {FLOWERS}; set AQHASH_SHARED_DATA"
)


# ---------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------


def _random_attention(rng, shape) -> np.ndarray:
    logits = rng.normal(size=shape)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_combined_maps_sum_to_one():
    rng = np.random.default_rng(0)
    attention = _random_attention(rng, (3, 5, 14 * 14 + 7 * 7))
    maps = explain.attention_maps(attention, [(14, 14), (7, 7)], (224, 224))

    assert maps.shape == (3, 5, 224, 224)
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    assert (maps >= 0).all()


def test_finest_map_keeps_scale_mass():
    rng = np.random.default_rng(1)
    attention = _random_attention(rng, (4, 16 + 4))
    maps = explain.attention_maps(attention, [(4, 4), (2, 2)], (64, 64), scale="finest")

    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), attention[:, :16].sum(axis=-1), atol=1e-5)


def test_uniform_attention_gives_uniform_map():
    attention = np.full((1, 20), 1.0 / 20, dtype=np.float32)
    heat = explain.times_uniform(explain.attention_maps(attention, [(4, 4), (2, 2)], (32, 48)))

    np.testing.assert_allclose(heat, 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "token, grids, hot_corner",
    [
        (1, [(2, 2)], (0, 1)),  # row-major: token 1 is the top-right cell
        (2, [(2, 2)], (1, 0)),
        (15, [(4, 4), (2, 2)], (1, 1)),  # last token of the first scale: bottom-right
        (16, [(4, 4), (2, 2)], (0, 0)),  # first token of the second scale: top-left
        (19, [(4, 4), (2, 2)], (1, 1)),
    ],
)
def test_token_lands_in_its_cell(token, grids, hot_corner):
    num_tokens = sum(h * w for h, w in grids)
    attention = np.zeros((num_tokens,), dtype=np.float32)
    attention[token] = 1.0
    maps = explain.attention_maps(attention, grids, (64, 64))

    quadrants = maps.reshape(2, 32, 2, 32).sum(axis=(1, 3))
    assert np.unravel_index(np.argmax(quadrants), (2, 2)) == hot_corner
    assert quadrants[hot_corner] > 0.5


def test_attention_maps_reject_bad_input():
    with pytest.raises(ValueError, match="20 tokens"):
        explain.attention_maps(np.ones((2, 21), np.float32), [(4, 4), (2, 2)], (8, 8))
    with pytest.raises(ValueError, match="float"):
        explain.attention_maps(np.ones((2, 4), np.int32), [(2, 2)], (8, 8))
    with pytest.raises(ValueError, match="scale"):
        explain.attention_maps(np.ones((2, 4), np.float32), [(2, 2)], (8, 8), scale="coarse")


def test_exemplars_sorted_by_strength():
    codes = np.array(
        [[0.9, 0.1], [-0.5, 0.3], [0.2, 0.5], [-0.9, 0.7], [0.0, 0.2]], dtype=np.float32
    )
    positive, negative = explain.select_exemplars(codes, 2)

    assert positive[0].tolist() == [0, 2]
    assert negative[0].tolist() == [3, 1]
    assert positive[1].tolist() == [3, 2]
    assert negative[1].tolist() == []


def test_exemplars_count_zero_at_h_zero_as_positive():
    codes = np.array([[0.0], [-0.1]], dtype=np.float32)
    positive, negative = explain.select_exemplars(codes, 5)

    assert positive[0].tolist() == [0]
    assert negative[0].tolist() == [1]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def test_heat_colors_brighten_monotonically():
    colors = plots.heat_colors(np.linspace(0.0, 1.0, 50)).astype(np.float64)
    brightness = colors @ np.array([0.299, 0.587, 0.114])

    assert np.all(np.diff(brightness) > 0)
    assert plots.heat_colors(np.array([-1.0, 2.0])).tolist() == plots.heat_colors(np.array([0.0, 1.0])).tolist()


def test_overlay_checks_shapes():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="heat must have shape"):
        plots.overlay_heat(image, np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="vmax"):
        plots.overlay_heat(image, np.zeros((8, 8)), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        plots.overlay_heat(image.astype(np.float32), np.zeros((8, 8)), 1.0)


def test_figure_layout_and_png(tmp_path):
    rng = np.random.default_rng(0)
    panel = 40
    panels = [
        plots.Panel(rng.integers(0, 255, (panel, panel, 3), dtype=np.uint8), rng.random((panel, panel)) * 3,
                    [plots.sign_caption(bit, 0.5 - bit / 4)], sign=1 if bit < 2 else -1)
        for bit in range(5)
    ]
    figure = plots.render_figure(["title"], [plots.Section("heading", panels, 4, 2)], panel_size=panel, vmax=3.0)
    path = plots.save_png(figure, tmp_path / "figure.png")

    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        assert loaded.size == figure.size
    assert figure.width >= 4 * panel
    assert figure.height >= 2 * panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_sign_caption_text():
    assert plots.sign_caption(3, 0.834) == ("bit 3: +1 (h=+0.83)", plots.POSITIVE_COLOR)
    assert plots.sign_caption(0, -0.2) == ("bit 0: -1 (h=-0.20)", plots.NEGATIVE_COLOR)


def test_panel_of_wrong_size_raises():
    panels = [plots.Panel(np.zeros((10, 10, 3), np.uint8))]
    with pytest.raises(ValueError, match="resize_rgb"):
        plots.render_figure([], [plots.Section("", panels, 1)], panel_size=20, vmax=None)


# ---------------------------------------------------------------------------------------------
# Two-scale CNN model (random weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_explainer():
    model = build_model({
        "backbone": "efficientnet_lite0", "code_length": 6, "width": 16, "num_heads": 2,
        "ffn_dim": 32, "bottleneck_width": 16, "aux": "none",
    })
    # model.init compiles for minutes on a busy 2-core CPU, so the shapes come from tracing alone
    # and the values from numpy: unit scales and variances, zero biases and means, small weights.
    shapes = jax.eval_shape(
        lambda images: model.init(jax.random.PRNGKey(0), images, train=False),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return explain.Explainer(model, variables, image_size=64, resize_size=73, batch_size=4)


@pytest.mark.slow
@needs_flowers
def test_cnn_grids_and_attention(cnn_explainer):
    paths = sorted(str(p) for p in (FLOWERS / "test").glob("*/*.jpg"))[:5]
    images = cnn_explainer.load_images(paths)
    codes, attention = cnn_explainer.encode(images)

    assert cnn_explainer.grid_shapes == [(4, 4), (2, 2)]
    assert images.shape == (5, 64, 64, 3)
    assert codes.shape == (5, 6)
    assert attention.shape == (5, 6, 20)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.abs(codes) < 1)

    # The padded last batch (5 = 4 + 1) gives the same result as encoding the image alone.
    single_codes, single_attention = cnn_explainer.encode(images[4:5])
    np.testing.assert_allclose(single_codes[0], codes[4], atol=1e-5)
    np.testing.assert_allclose(single_attention[0], attention[4], atol=1e-5)

    heat = cnn_explainer.heat_maps(attention[0], 64, "combined")
    np.testing.assert_allclose(heat.mean(axis=(-2, -1)), 1.0, atol=1e-4)
    figure = explain.image_figure(cnn_explainer, paths[0], images[0], codes[0], attention[0],
                                  panel_size=64, columns=4, scale="combined")
    assert figure.width > 4 * 64


@pytest.mark.slow
def test_encode_rejects_float_images(cnn_explainer):
    with pytest.raises(ValueError, match="uint8"):
        cnn_explainer.encode(np.zeros((1, 64, 64, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# Command line on a trained tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> Path:
    """Train configs/tiny.py on flowers12 once per session and return the workdir."""
    if not FLOWERS.is_dir():
        pytest.skip(f"flowers12 image folder not found at {FLOWERS}; set AQHASH_SHARED_DATA")
    workdir = tmp_path_factory.mktemp("explain_tiny_run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [
        sys.executable, "-m", "aqhash_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
        f"--workdir={workdir}", f"--config.data.root={FLOWERS}",
        "--config.loss.adsh.outer_iterations=1", "--config.loss.adsh.epochs_per_iteration=2",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _test_images(count: int) -> list[str]:
    classes = sorted(p for p in (FLOWERS / "test").iterdir() if p.is_dir())
    return [str(sorted(folder.glob("*.jpg"))[0]) for folder in classes[:count]]


@pytest.fixture(scope="session")
def explain_output(trained_workdir, tmp_path_factory):
    """Run the command line once with every figure type; return (output folder, exit status, paths)."""
    out = tmp_path_factory.mktemp("explain_out")
    images = _test_images(3)
    argv = [
        "--workdir", str(trained_workdir), "--out", str(out), "--images", images[0], images[1],
        "--query", images[0], "--result", images[2], "--database-limit", "60", "--exemplars", "3",
        "--panel-size", "96",
    ]
    status = explain.main(argv)
    return out, status, images


@pytest.mark.slow
def test_cli_writes_expected_files(explain_output):
    out, status, images = explain_output
    names = sorted(p.name for p in out.iterdir())
    stem = [Path(image).stem for image in images]

    assert status == 0
    assert f"image_00_{stem[0]}.png" in names
    assert f"image_01_{stem[1]}.png" in names
    assert f"pair_{stem[0]}_{stem[2]}.png" in names
    assert [name for name in names if name.startswith("bit_0")] == [f"bit_{bit:02d}.png" for bit in range(8)]
    assert "bits_overview.png" in names
    assert "bit_stats.json" in names
    assert not [name for name in names if name.endswith(".tmp")]


@pytest.mark.slow
def test_cli_png_sizes(explain_output):
    out, _, images = explain_output
    panel = 96

    for name in os.listdir(out):
        if not name.endswith(".png"):
            continue
        with Image.open(out / name) as image:
            assert image.format == "PNG", name
            assert image.mode == "RGB", name
            assert image.width >= 2 * panel, name
            assert image.height >= panel, name

    # One input panel and 8 bit panels in rows of 8: two rows of panels, 9 panel columns do not fit.
    with Image.open(out / f"image_00_{Path(images[0]).stem}.png") as image:
        assert 8 * panel <= image.width < 9 * (panel + 6) + 200
        assert image.height >= 2 * panel
    with Image.open(out / "bits_overview.png") as image:
        assert image.height >= 8 * (panel // 2)


@pytest.mark.slow
def test_cli_bit_stats_match_export(explain_output, trained_workdir):
    out, _, _ = explain_output
    written = json.loads((out / "bit_stats.json").read_text())
    codes = load_codes(trained_workdir / "export" / "database_codes.npy")
    expected = bit_stats.bit_statistics(codes.signs())

    assert written["code_length"] == 8
    assert written["num_codes"] == codes.num_rows
    assert written["bits"] == expected["bits"]
    assert written["duplicate_pairs"] == [list(pair) for pair in expected["duplicate_pairs"]]


@pytest.mark.slow
def test_trained_attention_sums_to_one(trained_workdir):
    explainer = explain.Explainer.from_workdir(str(trained_workdir), batch_size=4)
    images = explainer.load_images(_test_images(3))
    codes, attention = explainer.encode(images)

    assert explainer.grid_shapes == [(2, 2)]
    assert attention.shape == (3, 8, 4)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    maps = explain.attention_maps(attention, explainer.grid_shapes, (32, 32))
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)


@pytest.mark.slow
def test_recomputed_signs_match_export(trained_workdir):
    explainer = explain.Explainer.from_workdir(str(trained_workdir), batch_size=16)
    database = load_codes(trained_workdir / "export" / "database_codes.npy")
    rows = np.arange(0, database.num_rows, 48)
    codes = explainer.encode_paths([database.paths[row] for row in rows])

    signs = np.where(codes >= 0, 1, -1)
    # Codes within 1e-4 of zero may flip between batch layouts, so only clear signs must match.
    clear = np.abs(codes) > 1e-4
    assert clear.mean() > 0.9
    assert np.array_equal(signs[clear], database.signs()[rows][clear])


@pytest.mark.slow
def test_cli_missing_image_fails(trained_workdir, tmp_path, capsys):
    status = explain.main(["--workdir", str(trained_workdir), "--out", str(tmp_path), "--images", "/no/such.jpg"])

    assert status == explain.USAGE_ERROR
    assert "image file not found: /no/such.jpg" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_query_without_result_fails(trained_workdir, tmp_path, capsys):
    image = _test_images(1)[0]
    status = explain.main(["--workdir", str(trained_workdir), "--out", str(tmp_path), "--query", image])

    assert status == explain.USAGE_ERROR
    assert "--query and --result must be given together" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_stats_only(trained_workdir, tmp_path):
    status = explain.main(["--workdir", str(trained_workdir), "--out", str(tmp_path), "--database-limit", "0"])

    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bit_stats.json"]
