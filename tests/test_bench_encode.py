"""Tests of the encoding benchmark: a --quick run on a small CUB-style folder written here."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from aqhash_jax.benchmarks import bench_encode

NUM_CLASSES = 2
IMAGES_PER_CLASS = 8


def _write_cub(root: Path) -> Path:
    """Write a CUB-style folder in the comma form: ids from 0, "<id>, <value>" lines."""
    rng = np.random.default_rng(0)
    image_lines, label_lines, split_lines = [], [], []
    class_lines = [f"{c}, species_{c}" for c in range(NUM_CLASSES)]
    image_id = 0
    for class_id in range(NUM_CLASSES):
        folder = root / "images" / f"species_{class_id}"
        folder.mkdir(parents=True)
        for k in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (72, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.jpg")
            image_lines.append(f"{image_id}, species_{class_id}/{k}.jpg")
            label_lines.append(f"{image_id}, {class_id}")
            split_lines.append(f"{image_id}, {k % 2}")
            image_id += 1
    for name, lines in (("images.txt", image_lines), ("classes.txt", class_lines),
                        ("image_class_labels.txt", label_lines), ("train_test_split.txt", split_lines)):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _table(report: str, header_start: str) -> list[list[str]]:
    """Return the body rows of the Markdown table whose header starts with `header_start`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    root = _write_cub(tmp_path_factory.mktemp("cub"))
    output = tmp_path_factory.mktemp("report") / "nested" / "bench_encode.md"
    status = bench_encode.main(
        ["--quick", "--root", str(root), "--host-allocator", "system", "--output", str(output)]
    )
    return status, output


def test_quick_run_writes_report(quick_report):
    status, output = quick_report
    assert status == 0
    assert output.is_file()
    assert not list(output.parent.glob("*.tmp"))
    text = output.read_text()
    assert "Command: `python -m aqhash_jax.benchmarks.bench_encode --quick" in text
    assert re.search(r"Date: \d{4}-\d{2}-\d{2}", text)
    assert "Load average (1, 5, 15 min) before:" in text
    assert "host allocator system" in text


def test_pipeline_rows_positive(quick_report):
    rows = _table(quick_report[1].read_text(), "| worker processes")
    assert [row[0] for row in rows] == ["0", "2"]
    for row in rows:
        assert float(row[1]) > 0


def test_model_rows_cover_configs(quick_report):
    rows = _table(quick_report[1].read_text(), "| model")
    names = [row[0] for row in rows]
    assert names == [
        "backbone alone (efficientnet_lite0)",
        "backbone + head (cub100, 12 bits)",
        "backbone + head (cub100, 48 bits)",
        "backbone + head (default, 12 bits)",
        "backbone + head (default, 48 bits)",
    ]


def test_model_numbers_in_range(quick_report):
    rows = _table(quick_report[1].read_text(), "| model")
    for row in rows:
        images_per_second, ms_per_image = float(row[1]), float(row[2])
        assert images_per_second > 0
        assert ms_per_image > 0
        assert float(row[5]) > 0
        assert row[7] in ("yes / yes", "yes / no", "no / yes", "no / no")
    for row in rows[1:]:
        head_share = float(row[4].rstrip("%")) / 100
        assert -0.5 <= head_share < 1.0


def test_head_flops_exceed_backbone(quick_report):
    rows = _table(quick_report[1].read_text(), "| model")
    backbone_flops = float(rows[0][5])
    for row in rows[1:]:
        assert float(row[5]) > backbone_flops


def test_random_variables_finite():
    shapes = {"params": {"dense": {"kernel": jax.ShapeDtypeStruct((64, 8), np.float32),
                                   "bias": jax.ShapeDtypeStruct((8,), np.float32)},
                         "norm": {"scale": jax.ShapeDtypeStruct((8,), np.float32)}},
              "batch_stats": {"norm": {"mean": jax.ShapeDtypeStruct((8,), np.float32),
                                       "var": jax.ShapeDtypeStruct((8,), np.float32)}}}
    variables = bench_encode.random_variables(shapes, seed=0)
    kernel = np.asarray(variables["params"]["dense"]["kernel"])
    assert kernel.shape == (64, 8)
    assert np.all(np.isfinite(kernel))
    assert 0.05 < kernel.std() < 0.25
    assert np.all(np.asarray(variables["params"]["dense"]["bias"]) == 0)
    assert np.all(np.asarray(variables["params"]["norm"]["scale"]) == 1)
    assert np.all(np.asarray(variables["batch_stats"]["norm"]["mean"]) == 0)
    assert np.all(np.asarray(variables["batch_stats"]["norm"]["var"]) == 1)


def test_too_few_images_rejected(tmp_path):
    root = _write_cub(tmp_path / "cub")
    with pytest.raises(ValueError, match="lower --num-batches or --batch-size"):
        bench_encode.main(["--quick", "--root", str(root), "--batch-size", "8", "--workers", "0"])
