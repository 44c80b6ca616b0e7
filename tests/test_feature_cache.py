"""Tests of the on-disk feature cache: extraction once, reuse, keys, views, atomicity."""

from __future__ import annotations

import os

import numpy as np
import pytest

from aqhash_jax.training.feature_cache import build_cache, cache_key

PATHS = [f"img_{i}.jpg" for i in range(10)]
KEY = {"backbone": "efficientnet_lite0", "weights": "abc", "image_size": 32}


def fake_batches(calls: list, fail_after: int | None = None):
    """Return an extract_batches callable whose features encode row and view."""

    def extract():
        calls.append(1)
        for start in range(0, 12, 4):
            rows = np.arange(start, start + 4)
            rows = np.where(rows < len(PATHS), rows, -1)
            if fail_after is not None and start >= fail_after:
                raise RuntimeError("extraction failed")
            views = []
            for view in range(2):
                value = rows[:, None, None, None] * 10.0 + view
                views.append({
                    "feature_maps": [np.broadcast_to(value, (4, 2, 2, 3)), np.broadcast_to(value, (4, 1, 1, 5))],
                    "pooled": np.broadcast_to(value[:, :, 0, 0], (4, 5)),
                })
            yield rows, views[0], views[1]

    return extract


def test_extracts_once_then_reuses(tmp_path):
    calls = []
    cache, extracted = build_cache(str(tmp_path), KEY, PATHS, fake_batches(calls))
    assert extracted
    again, extracted_again = build_cache(str(tmp_path), KEY, PATHS, fake_batches(calls))
    assert not extracted_again
    assert len(calls) == 1
    assert again.folder == cache.folder
    assert again.map_shapes == [(2, 2, 3), (1, 1, 5)]
    assert again.maps[0][0].dtype == np.float16


def test_gather_picks_rows_and_views(tmp_path):
    cache, _ = build_cache(str(tmp_path), KEY, PATHS, fake_batches([]))
    rows = cache.rows_of(["img_7.jpg", "img_2.jpg", "img_7.jpg"])
    np.testing.assert_array_equal(rows, [7, 2, 7])
    maps = cache.gather_maps(rows, np.array([1, 0, 0]))
    np.testing.assert_array_equal(maps[0][:, 0, 0, 0], [71.0, 20.0, 70.0])
    np.testing.assert_array_equal(maps[1][:, 0, 0, 0], [71.0, 20.0, 70.0])
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.rows_of(["missing.jpg"])


def test_key_depends_on_fields_and_paths():
    base = cache_key(KEY, PATHS)
    assert cache_key(dict(KEY, image_size=64), PATHS) != base
    assert cache_key(dict(KEY, weights="other"), PATHS) != base
    assert cache_key(KEY, PATHS[::-1]) != base
    assert cache_key(dict(KEY), list(PATHS)) == base


def test_failed_extraction_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="extraction failed"):
        build_cache(str(tmp_path), KEY, PATHS, fake_batches([], fail_after=4))
    assert os.listdir(tmp_path) == []
    calls = []
    _, extracted = build_cache(str(tmp_path), KEY, PATHS, fake_batches(calls))
    assert extracted and len(calls) == 1


def test_incomplete_loader_is_an_error(tmp_path):
    def short():
        rows = np.arange(4)
        view = {"feature_maps": [np.zeros((4, 1, 1, 2))], "pooled": np.zeros((4, 2))}
        yield rows, view, view

    with pytest.raises(RuntimeError, match="wrote 4 of 10 rows"):
        build_cache(str(tmp_path), KEY, PATHS, short)
    assert os.listdir(tmp_path) == []
