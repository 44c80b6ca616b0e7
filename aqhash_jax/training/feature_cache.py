"""On-disk cache of frozen-backbone features for training the head alone ("features" mode).

Every image of the union of the train, validation, query and database splits (deduplicated by
path) is run through the frozen backbone once, as the evaluation-preprocessed image (view 0) and
its horizontal flip (view 1). The cache stores, per view, every feature map and the pooled
features as float16 `.npy` files, so training and evaluation read them through `np.load(...,
mmap_mode="r")` without holding them in memory.

A cache folder is named by a key over everything that changes the features: backbone name,
weights fingerprint, image size, resize size, input normalisation, compute dtype, convolution
formulation and the list of image paths. It is written into a temporary folder and renamed
into place when complete, so a killed extraction leaves no partial cache. When several
processes fill the same folder, the first rename wins and the others discard their copy.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from aqhash_jax.retrieval.export import compute_fingerprint

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NUM_VIEWS = 2


def cache_key(key_fields: dict, paths: Sequence[str]) -> str:
    """Return the folder name of a cache: a hash of `key_fields` and the ordered image paths."""
    payload = dict(key_fields)
    payload["format_version"] = CACHE_FORMAT_VERSION
    payload["paths"] = compute_fingerprint(list(paths))
    return compute_fingerprint(payload)[:20]


def _map_file(view: int, index: int) -> str:
    return f"view{view}_map{index}.npy"


def _pooled_file(view: int) -> str:
    return f"view{view}_pooled.npy"


class FeatureCache:
    """Read access to a complete cache folder.

    Attributes:
      folder: the cache folder.
      paths: image path of every cache row.
      map_shapes: per feature map, its [h, w, C].
      pooled_dim: C of the pooled features.
    """

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        self.manifest = manifest
        self.paths: list[str] = manifest["paths"]
        self.map_shapes = [tuple(shape) for shape in manifest["map_shapes"]]
        self.pooled_dim = int(manifest["pooled_dim"])
        self._row_of_path = {path: row for row, path in enumerate(self.paths)}
        self.maps = [
            [np.load(os.path.join(folder, _map_file(view, i)), mmap_mode="r") for i in range(len(self.map_shapes))]
            for view in range(NUM_VIEWS)
        ]
        self.pooled = [np.load(os.path.join(folder, _pooled_file(view)), mmap_mode="r") for view in range(NUM_VIEWS)]

    def __len__(self) -> int:
        return len(self.paths)

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """Return int64 [n] cache rows of the given image paths; raises KeyError for a missing path."""
        missing = [path for path in paths if path not in self._row_of_path]
        if missing:
            raise KeyError(
                f"{len(missing)} images are not in the feature cache {self.folder}, for example "
                f"{missing[0]!r}; delete the cache folder to rebuild it"
            )
        return np.asarray([self._row_of_path[path] for path in paths], dtype=np.int64)

    def gather_maps(self, rows: np.ndarray, views: np.ndarray) -> list[np.ndarray]:
        """Return the feature maps of cache `rows` (int [b]) in `views` (int [b], 0 or 1).

        Returns a list of float16 [b, h, w, C] arrays, one per feature map.
        """
        rows = np.asarray(rows, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        if rows.shape != views.shape or rows.ndim != 1:
            raise ValueError(f"rows {rows.shape} and views {views.shape} must be equal 1-D shapes")
        out = []
        for index, shape in enumerate(self.map_shapes):
            batch = np.empty((rows.shape[0],) + shape, dtype=np.float16)
            for view in range(NUM_VIEWS):
                selected = np.flatnonzero(views == view)
                if selected.size:
                    # Sorted reads are sequential on disk; the memmap copies only these rows.
                    order = np.argsort(rows[selected], kind="stable")
                    batch[selected[order]] = self.maps[view][index][rows[selected[order]]]
            out.append(batch)
        return out


def build_cache(
    cache_root: str,
    key_fields: dict,
    paths: Sequence[str],
    extract_batches: Callable[[], Iterable[tuple[np.ndarray, dict, dict]]],
) -> tuple[FeatureCache, bool]:
    """Open the cache for `key_fields` and `paths`, extracting the features when it is missing.

    Args:
      cache_root: local folder holding cache folders.
      key_fields: JSON-serialisable dict of everything that changes the features.
      paths: image path of every row to cache, in row order.
      extract_batches: called only when the cache is missing; yields `(rows, view0, view1)` with
        `rows` int64 [b] (cache rows, -1 for padding) and each view a dict with
        "feature_maps" (list of float [b, h, w, C]) and "pooled" (float [b, C]) as numpy arrays.

    Returns:
      (cache, extracted): `extracted` is False when an existing cache was reused.
    """
    key = cache_key(key_fields, paths)
    folder = os.path.join(cache_root, key)
    if os.path.exists(os.path.join(folder, MANIFEST)):
        logging.info("reusing feature cache %s (%d images)", folder, len(paths))
        return FeatureCache(folder), False

    os.makedirs(cache_root, exist_ok=True)
    temporary = os.path.join(cache_root, f".tmp-{key}-{uuid.uuid4().hex}")
    os.makedirs(temporary)
    logging.info("extracting backbone features of %d images into %s", len(paths), folder)
    try:
        _fill_cache(temporary, key_fields, paths, extract_batches)
        try:
            os.rename(temporary, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, MANIFEST)):
                raise
            # Another process finished the same cache first; its copy is identical.
            logging.info("feature cache %s was completed by another process; using it", folder)
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return FeatureCache(folder), True


def _fill_cache(folder: str, key_fields: dict, paths: Sequence[str], extract_batches: Callable) -> None:
    num_rows = len(paths)
    written = np.zeros(num_rows, dtype=bool)
    maps: list[list[np.ndarray]] | None = None
    pooled: list[np.ndarray] | None = None
    map_shapes: list[tuple[int, ...]] = []
    start = time.perf_counter()
    last_log = start

    for rows, *views in extract_batches():
        rows = np.asarray(rows, dtype=np.int64)
        real = rows >= 0
        if maps is None:
            map_shapes = [tuple(np.shape(m)[1:]) for m in views[0]["feature_maps"]]
            pooled_dim = int(np.shape(views[0]["pooled"])[1])
            maps = [
                [
                    np.lib.format.open_memmap(
                        os.path.join(folder, _map_file(view, i)), mode="w+", dtype=np.float16,
                        shape=(num_rows,) + shape,
                    )
                    for i, shape in enumerate(map_shapes)
                ]
                for view in range(NUM_VIEWS)
            ]
            pooled = [
                np.lib.format.open_memmap(
                    os.path.join(folder, _pooled_file(view)), mode="w+", dtype=np.float16,
                    shape=(num_rows, pooled_dim),
                )
                for view in range(NUM_VIEWS)
            ]

        for view, outputs in enumerate(views):
            for i, feature_map in enumerate(outputs["feature_maps"]):
                maps[view][i][rows[real]] = np.asarray(feature_map)[real].astype(np.float16)
            pooled[view][rows[real]] = np.asarray(outputs["pooled"])[real].astype(np.float16)
        written[rows[real]] = True

        now = time.perf_counter()
        if now - last_log > 30 or written.all():
            done = int(written.sum())
            rate = done / max(now - start, 1e-9)
            logging.info(
                "feature extraction: %d/%d images, %.1f images/s (two views each), %.0f s left",
                done, num_rows, rate, (num_rows - done) / max(rate, 1e-9),
            )
            last_log = now

    if maps is None or not written.all():
        raise RuntimeError(
            f"feature extraction wrote {int(written.sum())} of {num_rows} rows; the image loader "
            "stopped early"
        )
    for array in [m for view_maps in maps for m in view_maps] + pooled:
        array.flush()
    del maps, pooled

    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "key_fields": key_fields,
        "paths": list(paths),
        "map_shapes": [list(shape) for shape in map_shapes],
        "pooled_dim": pooled_dim,
        "views": ["eval", "eval_hflip"],
        "seconds": time.perf_counter() - start,
    }
    manifest_path = os.path.join(folder, MANIFEST)
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    os.replace(manifest_path + ".tmp", manifest_path)
    logging.info(
        "feature extraction finished: %d images in %.1f s", num_rows, manifest["seconds"]
    )
