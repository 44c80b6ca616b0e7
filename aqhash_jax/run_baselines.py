r"""Run the retrieval baselines on pooled backbone features and write a table of mAP@all.

  python -m aqhash_jax.run_baselines --config=configs/cub100.py --workdir=DIR [--bits 12,24,32,48]

The database is the training split and the query set is the test split. Features are the
global-pooled outputs of the frozen ImageNet backbone named by the config, computed with the
evaluation preprocessing of the data pipeline. They are saved to DIR/features_{database,query}.npy
(with labels and a JSON sidecar) on the first run and reused afterwards.

Results: DIR/baselines.json and DIR/baselines.md (tie-aware and ranked mAP@all over the whole
database for LSH, ITQ and the linear supervised hash at each code length, plus cosine on the float
features). Both files are written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from aqhash_jax import baselines, host_memory, pretrained
from aqhash_jax.data import pipeline
from aqhash_jax.data.sources import ImageSplit, load_retrieval_splits
from aqhash_jax.models import chunking
from aqhash_jax.models.backbones import create_backbone, input_normalization
from aqhash_jax.retrieval import retrieval_metrics
from aqhash_jax.training import feature_cache
from aqhash_jax.training.model_init import backbone_variables, variables_fingerprint

def define_flags() -> None:
    """Define the command-line flags. Called only when the module runs as a program, because
    aqhash_jax.train defines a flag of the same name ("config") and both are imported in tests."""
    config_flags.DEFINE_config_file("config", None, "Training config file, for example configs/cub100.py.")
    flags.DEFINE_string("workdir", None, "Folder for the saved features and the result files.")
    flags.DEFINE_list("bits", ["12", "24", "32", "48"], "Comma-separated code lengths in bits.")
    flags.DEFINE_integer("lsh_seeds", 3, "Number of LSH projection seeds to average over.")
    flags.DEFINE_integer("linear_epochs", 100, "Training epochs of the linear supervised hash.")
    flags.DEFINE_integer("seed", 0, "Seed of ITQ and of the linear supervised hash.")
    flags.DEFINE_integer("batch_size", 32, "Images per batch during feature extraction.")
    flags.DEFINE_string(
        "feature_cache_dir",
        "",
        "Training feature cache to read pooled features from; empty uses config.train.feature_cache_dir, "
        "else WORKDIR/feature_cache.",
    )


METHODS = ("lsh", "itq", "linear")
METHOD_TITLES = {"lsh": "LSH", "itq": "ITQ", "linear": "linear supervised"}


# ---------------------------------------------------------------------------------------------
# File helpers


def _replace_atomically(path: str, mode: str, write: Callable[[Any], None]) -> None:
    """Call `write(stream)` on a temporary file in the folder of `path`, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
        # mkstemp creates the file readable by its owner only.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    _replace_atomically(path, "w", lambda stream: stream.write(text))


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """Save `array` as a .npy file at `path` atomically."""
    _replace_atomically(path, "wb", lambda stream: np.save(stream, array))


# ---------------------------------------------------------------------------------------------
# Pooled features: saved files, the training feature cache, or direct extraction


def feature_fields(config, variables: dict) -> dict[str, Any]:
    """Return everything that changes the pooled features; saved features are reused only on a match.

    The keys and values are those of the training feature cache, so the same dict also selects a
    qualifying cache folder.
    """
    mean, std = input_normalization(config.model.backbone)
    return {
        "backbone": str(config.model.backbone),
        "weights": variables_fingerprint(variables),
        "image_size": int(config.data.image_size),
        "resize_size": int(config.data.resize_size),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "conv_impl": str(config.model.conv_impl),
    }


def _feature_paths(workdir: str, split_role: str) -> tuple[str, str, str]:
    return (
        os.path.join(workdir, f"features_{split_role}.npy"),
        os.path.join(workdir, f"labels_{split_role}.npy"),
        os.path.join(workdir, f"features_{split_role}.json"),
    )


def load_saved_features(
    workdir: str, split_role: str, split: ImageSplit, fields: dict
) -> tuple[np.ndarray, dict] | None:
    """Return (float32 [n, dim] features, sidecar dict) saved by an earlier run, or None when absent or stale.

    Saved features are reused only when their sidecar lists the same feature fields and the same
    image paths, in the same order, as `split`.
    """
    features_path, labels_path, sidecar_path = _feature_paths(workdir, split_role)
    if not all(os.path.exists(path) for path in (features_path, labels_path, sidecar_path)):
        return None
    with open(sidecar_path, encoding="utf-8") as stream:
        sidecar = json.load(stream)
    if sidecar.get("fields") != fields or sidecar.get("paths") != list(split.paths):
        logging.warning(
            "saved features %s were computed with other settings or images; extracting them again", features_path
        )
        return None
    features = np.load(features_path)
    if features.dtype != np.float32 or features.shape[0] != len(split):
        logging.warning("saved features %s have dtype %s and shape %s; extracting them again",
                        features_path, features.dtype, features.shape)
        return None
    logging.info("reusing saved %s features %s, shape %s", split_role, features_path, features.shape)
    return features, sidecar


def save_features(workdir: str, split_role: str, split: ImageSplit, fields: dict, features: np.ndarray,
                  info: dict) -> None:
    """Save features, labels and a JSON sidecar (fields, `info` on how they were obtained, image paths)."""
    features_path, labels_path, sidecar_path = _feature_paths(workdir, split_role)
    save_npy_atomic(features_path, features)
    save_npy_atomic(labels_path, np.asarray(split.labels))
    sidecar = {"fields": fields, "info": info, "shape": list(features.shape), "paths": list(split.paths)}
    write_atomic(sidecar_path, json.dumps(sidecar, indent=1))


def find_cached_pooled_features(cache_root: str, fields: dict, paths: list[str]) -> np.ndarray | None:
    """Look for a complete training feature cache with these fields and return its pooled features.

    The training job caches float16 pooled features of the evaluation view (view 0) for every
    image of its splits. A cache qualifies when its key fields include `fields` (see
    `feature_fields`), it was computed in float32, and it contains every path.

    Returns:
      float32 [len(paths), dim] in the order of `paths`, or None when no cache qualifies.
    """
    if not cache_root or not os.path.isdir(cache_root):
        return None
    for name in sorted(os.listdir(cache_root)):
        folder = os.path.join(cache_root, name)
        manifest_path = os.path.join(folder, feature_cache.MANIFEST)
        if name.startswith(".") or not os.path.exists(manifest_path):
            continue
        with open(manifest_path, encoding="utf-8") as stream:
            key_fields = json.load(stream).get("key_fields", {})
        cached = {key: key_fields.get(key) for key in fields}
        if cached != fields or key_fields.get("dtype") != "float32":
            continue
        cache = feature_cache.FeatureCache(folder)
        try:
            rows = cache.rows_of(paths)
        except KeyError:
            continue
        logging.info("reading pooled features of %d images from the training feature cache %s", len(paths), folder)
        return np.asarray(cache.pooled[0][rows], dtype=np.float32)
    return None


def load_backbone_variables(config) -> dict:
    """Return the frozen backbone variables that `config.model.init` names, as numpy arrays.

    "random" initialises them from `config.seed` through the training job's initialiser; any other
    value is read with `aqhash_jax.pretrained.resolve_init`. The tree is the one the training job
    builds, so its weights fingerprint matches the training feature cache.
    """
    init = str(config.model.init)
    if init == "random":
        return backbone_variables(config, jax.random.PRNGKey(int(config.seed)))
    loaded = pretrained.resolve_init(init, backbone=str(config.model.backbone))
    logging.info("backbone %s: weights from %s", config.model.backbone, init)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(dict(loaded)))


def extract_pooled_features(config, variables: dict, split: ImageSplit, batch_size: int) -> np.ndarray:
    """Run the frozen backbone over `split` with evaluation preprocessing; return float32 [n, C].

    Uses the data pipeline's evaluation loader (resize to `config.data.resize_size` on the shorter
    side, centre crop `config.data.image_size`, normalisation of the backbone) on one process.
    """
    mean, std = input_normalization(config.model.backbone)
    image_size = int(config.data.image_size)
    module = create_backbone(
        config.model.backbone, dtype=jnp.float32, conv_impl=config.model.conv_impl, image_size=image_size
    )
    apply_fn = jax.jit(
        lambda images: chunking.apply_in_chunks(
            lambda chunk: module.apply(variables, chunk, train=False)["pooled"],
            images,
            chunk_size=config.model.get("inference_chunk_size"),
        )
    )
    loader = pipeline.make_eval_loader(
        split,
        global_batch_size=batch_size,
        image_size=image_size,
        resize_size=int(config.data.resize_size),
        mean=mean,
        std=std,
        shard_index=0,
        shard_count=1,
        **pipeline.loader_kwargs_from_config(config.data),
    )

    features = None
    written = np.zeros(len(split), dtype=bool)
    start = last_log = time.perf_counter()
    for batch in loader:
        pooled = np.asarray(jax.device_get(apply_fn(batch["image"])), dtype=np.float32)
        if features is None:
            features = np.zeros((len(split), pooled.shape[1]), dtype=np.float32)
        rows = np.asarray(batch["index"])[np.asarray(batch["mask"])]
        features[rows] = pooled[np.asarray(batch["mask"])]
        written[rows] = True

        now = time.perf_counter()
        if now - last_log > 20 or written.all():
            done = int(written.sum())
            logging.info("%s: %d/%d images, %.1f images/s", split.name, done, len(split), done / (now - start))
            last_log = now

    if features is None or not written.all():
        raise RuntimeError(
            f"feature extraction of split {split.name!r} wrote {int(written.sum())} of {len(split)} rows; the "
            "evaluation loader stopped early or skipped images"
        )
    return features


def load_or_extract_features(config, workdir: str, cache_root: str, batch_size: int) -> tuple[dict, dict, dict]:
    """Return ({role: float32 features}, {role: int labels}, info) for the database and query roles.

    Order of preference: features saved in `workdir` by an earlier run, the training feature cache
    under `cache_root`, extraction with the backbone. Newly obtained features are saved to
    `workdir`, so later runs skip the backbone (its weights are still loaded, to check that they
    are the ones the saved features came from).
    """
    splits = load_retrieval_splits(config.data)
    role_splits = {"database": splits.database, "query": splits.query}
    variables = load_backbone_variables(config)
    fields = feature_fields(config, variables)

    features, labels, info = {}, {}, {}
    for role, split in role_splits.items():
        labels[role] = np.asarray(split.labels)
        if labels[role].ndim != 1:
            raise ValueError(
                f"the {role} split has multi-hot labels of shape {labels[role].shape}; the baselines need one "
                "class id per image"
            )
        saved = load_saved_features(workdir, role, split, fields)
        if saved is not None:
            features[role], sidecar = saved
            info[role] = {"source": "saved", "saved_by": sidecar.get("info", {})}
            continue

        start = time.perf_counter()
        cached = find_cached_pooled_features(cache_root, fields, list(split.paths))
        if cached is not None:
            features[role], source = cached, "training feature cache"
        else:
            logging.info("extracting pooled %s features of %d images (%s)", role, len(split), split.name)
            features[role], source = extract_pooled_features(config, variables, split, batch_size), "extracted"
        seconds = time.perf_counter() - start
        info[role] = {"source": source, "seconds": seconds, "images_per_second": len(split) / max(seconds, 1e-9)}
        save_features(workdir, role, split, fields, features[role], info[role])
    return features, labels, info


# ---------------------------------------------------------------------------------------------
# Evaluation


def parse_bits(values: list[str]) -> list[int]:
    """Parse code lengths such as ["12", "24"]; raise ValueError for non-integers or values < 1."""
    code_lengths = []
    for value in values:
        try:
            bits = int(value)
        except ValueError:
            raise ValueError(f"--bits must be comma-separated integers, got {value!r}.") from None
        if bits < 1:
            raise ValueError(f"--bits values must be at least 1, got {bits}.")
        code_lengths.append(bits)
    if not code_lengths:
        raise ValueError("--bits is empty; pass at least one code length, for example --bits 12,24,32,48.")
    return code_lengths


def evaluate_codes(query_codes, db_codes, query_labels, db_labels) -> dict[str, float]:
    """Return tie-aware and ranked mAP@all of Hamming ranking over the whole database."""
    results = {}
    for ranking, key in (("tie-aware", "map_tie_aware"), ("ranked", "map_ranked")):
        metrics = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking=ranking)
        results[key] = float(metrics["map"])
    return results


def run_all_baselines(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    code_lengths: list[int],
    *,
    lsh_seeds: int,
    seed: int,
    linear_epochs: int,
) -> dict[str, Any]:
    """Compute cosine mAP@all and the tie-aware and ranked mAP@all of each hashing baseline.

    Args:
      features: {"database": float32 [n_db, dim], "query": float32 [n_query, dim]}.
      labels: {"database": int [n_db], "query": int [n_query]}.
      code_lengths: code lengths in bits.
      lsh_seeds: LSH uses seeds 0 .. lsh_seeds - 1 and reports the mean of each metric.
      seed: seed of ITQ and of the linear supervised hash.
      linear_epochs: training epochs of the linear supervised hash.

    Returns:
      {"cosine": {"map": float, "seconds": float},
       "lsh" | "itq" | "linear": {str(bits): {"map_tie_aware", "map_ranked", "seconds", ...}}}.
    """
    query_features, db_features = features["query"], features["database"]
    query_labels, db_labels = labels["query"], labels["database"]
    results: dict[str, Any] = {}

    start = time.perf_counter()
    cosine = baselines.cosine_map_at_all(query_features, db_features, query_labels, db_labels)
    results["cosine"] = {"map": cosine, "seconds": time.perf_counter() - start}
    logging.info("cosine (float features): mAP@all %.4f", cosine)

    for method in METHODS:
        results[method] = {}
    for bits in code_lengths:
        start = time.perf_counter()
        per_seed = [
            evaluate_codes(
                *baselines.lsh_codes(query_features, db_features, bits, seed=lsh_seed), query_labels, db_labels
            )
            for lsh_seed in range(lsh_seeds)
        ]
        results["lsh"][str(bits)] = {
            "map_tie_aware": float(np.mean([run["map_tie_aware"] for run in per_seed])),
            "map_ranked": float(np.mean([run["map_ranked"] for run in per_seed])),
            "map_tie_aware_per_seed": [run["map_tie_aware"] for run in per_seed],
            "seconds": time.perf_counter() - start,
        }

        start = time.perf_counter()
        codes = baselines.itq_codes(query_features, db_features, bits, seed=seed)
        results["itq"][str(bits)] = {**evaluate_codes(*codes, query_labels, db_labels)}
        results["itq"][str(bits)]["seconds"] = time.perf_counter() - start

        start = time.perf_counter()
        codes = baselines.linear_hash_codes(
            query_features, db_features, db_labels, bits, seed=seed, epochs=linear_epochs
        )
        results["linear"][str(bits)] = {**evaluate_codes(*codes, query_labels, db_labels)}
        results["linear"][str(bits)]["seconds"] = time.perf_counter() - start

        for method in METHODS:
            entry = results[method][str(bits)]
            logging.info(
                "%s, %d bits: tie-aware mAP@all %.4f, ranked mAP@all %.4f (%.1f s)",
                METHOD_TITLES[method],
                bits,
                entry["map_tie_aware"],
                entry["map_ranked"],
                entry["seconds"],
            )
    return results


def format_table(results: dict[str, Any], code_lengths: list[int], title: str) -> str:
    """Render the results as a markdown table: one row per code length, tie-aware / ranked mAP@all."""
    lines = [
        f"### {title}",
        "",
        f"cosine on float features: mAP@all {results['cosine']['map']:.3f}",
        "",
        "| bits | " + " | ".join(f"{METHOD_TITLES[method]} (tie-aware / ranked)" for method in METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for bits in code_lengths:
        cells = [
            f"{results[method][str(bits)]['map_tie_aware']:.3f} / {results[method][str(bits)]['map_ranked']:.3f}"
            for method in METHODS
        ]
        lines.append(f"| {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def describe_hardware() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "jax_backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax_version": jax.__version__,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is missing; pass a config file such as --config=configs/cub100.py.")
    workdir = flags.FLAGS.workdir
    if not workdir:
        raise app.UsageError("--workdir is missing; pass a folder for the features and results.")
    try:
        host_memory.configure_host_allocator()
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    code_lengths = parse_bits(flags.FLAGS.bits)
    os.makedirs(workdir, exist_ok=True)
    total_start = time.perf_counter()

    # The evaluation protocol uses the whole training split as the database, so no validation
    # split is carved out of it.
    config = config.copy_and_resolve_references()
    config.data.validation_fraction = 0.0
    config.data.validation_per_class = 0

    cache_root = flags.FLAGS.feature_cache_dir or config.train.feature_cache_dir or os.path.join(workdir, "feature_cache")
    features, labels, feature_info = load_or_extract_features(config, workdir, cache_root, flags.FLAGS.batch_size)
    logging.info(
        "features: database %s, query %s", features["database"].shape, features["query"].shape
    )

    results = run_all_baselines(
        features,
        labels,
        code_lengths,
        lsh_seeds=flags.FLAGS.lsh_seeds,
        seed=flags.FLAGS.seed,
        linear_epochs=flags.FLAGS.linear_epochs,
    )
    data_name = os.path.basename(os.path.normpath(str(config.data.root))) or str(config.data.tfds_name)
    report = {
        "data": data_name,
        "backbone": str(config.model.backbone),
        "weights": str(config.model.init),
        "num_database": int(features["database"].shape[0]),
        "num_query": int(features["query"].shape[0]),
        "feature_dim": int(features["database"].shape[1]),
        "bits": code_lengths,
        "settings": {"lsh_seeds": flags.FLAGS.lsh_seeds, "seed": flags.FLAGS.seed, "linear_epochs": flags.FLAGS.linear_epochs,
                     "itq_iterations": 50},
        "features": feature_info,
        "results": results,
        "hardware": describe_hardware(),
        "wall_seconds": time.perf_counter() - total_start,
    }

    title = (
        f"{data_name}, {report['backbone']} pooled features ({report['feature_dim']}-d), "
        f"{report['num_query']} queries, {report['num_database']} database images"
    )
    table = format_table(results, code_lengths, title)
    write_atomic(os.path.join(workdir, "baselines.json"), json.dumps(report, indent=1) + "\n")
    write_atomic(os.path.join(workdir, "baselines.md"), table)
    print(table)
    logging.info("wrote %s and %s in %.1f s", os.path.join(workdir, "baselines.json"),
                 os.path.join(workdir, "baselines.md"), report["wall_seconds"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
