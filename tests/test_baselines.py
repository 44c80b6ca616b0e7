"""Tests for the retrieval baselines in aqhash_jax.baselines."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aqhash_jax import baselines, run_baselines
from aqhash_jax.retrieval import retrieval_metrics
from aqhash_jax.training import feature_cache

BITS = 16


def make_clustered_features(seed, *, num_classes=10, db_per_class=40, query_per_class=20, dim=96, nuisance_dims=4):
    """Draw class means in a 16-d subspace plus unit Gaussian noise, and add a few high-variance
    nuisance dimensions that carry no class information (they mislead PCA and random projections)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, 16)))
    class_means = (rng.standard_normal((num_classes, 16)) * 3.0) @ basis.T

    def draw(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        features = class_means[labels] + rng.standard_normal((labels.size, dim))
        features[:, :nuisance_dims] += rng.standard_normal((labels.size, nuisance_dims)) * 6.0
        return features.astype(np.float32), labels.astype(np.int32)

    db_features, db_labels = draw(db_per_class)
    query_features, query_labels = draw(query_per_class)
    return query_features, db_features, query_labels, db_labels


def tie_aware_map(query_codes, db_codes, query_labels, db_labels):
    return retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking="tie-aware")["map"]


def naive_cosine_map(query_features, db_features, query_labels, db_labels):
    """Average precision per query with Python loops over the sorted database."""
    average_precisions = []
    for query, label in zip(query_features.astype(np.float64), query_labels):
        similarity = [
            float(np.dot(query, item) / (np.linalg.norm(query) * np.linalg.norm(item))) for item in db_features
        ]
        order = sorted(range(len(similarity)), key=lambda index: -similarity[index])
        hits = 0
        precision_sum = 0.0
        for rank, index in enumerate(order, start=1):
            if db_labels[index] == label:
                hits += 1
                precision_sum += hits / rank
        average_precisions.append(precision_sum / hits if hits else 0.0)
    return float(np.mean(average_precisions))


@pytest.fixture(scope="module")
def clustered():
    return make_clustered_features(0)


@pytest.fixture(scope="module")
def baseline_maps(clustered):
    query_features, db_features, query_labels, db_labels = clustered
    lsh = np.mean(
        [
            tie_aware_map(*baselines.lsh_codes(query_features, db_features, BITS, seed=seed), query_labels, db_labels)
            for seed in range(3)
        ]
    )
    itq = tie_aware_map(*baselines.itq_codes(query_features, db_features, BITS, seed=0), query_labels, db_labels)
    linear = tie_aware_map(
        *baselines.linear_hash_codes(query_features, db_features, db_labels, BITS, seed=0, epochs=60),
        query_labels,
        db_labels,
    )
    return {"lsh": lsh, "itq": itq, "linear": linear}


# ---------------------------------------------------------------------------------------------
# Cosine mAP@all


def test_cosine_map_matches_naive(clustered):
    query_features, db_features, query_labels, db_labels = clustered
    query_features = query_features[:25]
    query_labels = query_labels[:25]
    expected = naive_cosine_map(query_features, db_features, query_labels, db_labels)

    assert baselines.cosine_map_at_all(
        query_features, db_features, query_labels, db_labels, chunk_size=7
    ) == pytest.approx(expected, abs=1e-9)
    assert baselines.cosine_map_at_all(
        query_features, db_features, query_labels, db_labels, chunk_size=1000
    ) == pytest.approx(expected, abs=1e-9)


def test_cosine_map_small_cases():
    db_features = np.array([[1, 0], [0, 1], [1, 0.1]], dtype=np.float32)
    db_labels = np.array([0, 1, 0])
    query_features = np.array([[1, 0.05], [0, 1]], dtype=np.float32)
    query_labels = np.array([0, 1])
    assert baselines.cosine_map_at_all(query_features, db_features, query_labels, db_labels) == pytest.approx(1.0)

    # The only relevant item for the query ranks last of three: AP = 1/3.
    far_query = np.array([[1, 0]], dtype=np.float32)
    assert baselines.cosine_map_at_all(far_query, db_features, np.array([1]), db_labels) == pytest.approx(1 / 3)


def test_cosine_map_query_without_relevant():
    db_features = np.eye(3, dtype=np.float32)
    db_labels = np.array([0, 1, 2])
    query_features = np.eye(3, dtype=np.float32)[:2]
    query_labels = np.array([0, 7])
    assert baselines.cosine_map_at_all(query_features, db_features, query_labels, db_labels) == pytest.approx(0.5)


def test_cosine_map_rejects_bad_inputs(clustered):
    query_features, db_features, query_labels, db_labels = clustered
    with pytest.raises(ValueError, match="float32"):
        baselines.cosine_map_at_all(query_features.astype(np.float64), db_features, query_labels, db_labels)
    with pytest.raises(ValueError, match="feature dimension"):
        baselines.cosine_map_at_all(query_features[:, :5], db_features, query_labels, db_labels)
    with pytest.raises(ValueError, match="query_labels"):
        baselines.cosine_map_at_all(query_features, db_features, query_labels[:-1], db_labels)
    with pytest.raises(ValueError, match="integer dtype"):
        baselines.cosine_map_at_all(query_features, db_features, query_labels.astype(np.float32), db_labels)
    with pytest.raises(ValueError, match="chunk_size"):
        baselines.cosine_map_at_all(query_features, db_features, query_labels, db_labels, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Codes: shapes, dtypes, determinism, input checks


CODE_FUNCTIONS = {
    "lsh": lambda q, d, y, bits, seed: baselines.lsh_codes(q, d, bits, seed=seed),
    "itq": lambda q, d, y, bits, seed: baselines.itq_codes(q, d, bits, seed=seed, iterations=10),
    "linear": lambda q, d, y, bits, seed: baselines.linear_hash_codes(q, d, y, bits, seed=seed, epochs=3),
}


@pytest.mark.parametrize("name", sorted(CODE_FUNCTIONS))
def test_codes_shape_and_dtype(name, clustered):
    query_features, db_features, _, db_labels = clustered
    query_codes, db_codes = CODE_FUNCTIONS[name](query_features, db_features, db_labels, 12, 0)

    assert query_codes.dtype == np.int8
    assert db_codes.dtype == np.int8
    assert query_codes.shape == (query_features.shape[0], 12)
    assert db_codes.shape == (db_features.shape[0], 12)
    assert set(np.unique(query_codes)) <= {-1, 1}
    assert set(np.unique(db_codes)) <= {-1, 1}


@pytest.mark.parametrize("name", sorted(CODE_FUNCTIONS))
def test_codes_deterministic_for_seed(name, clustered):
    query_features, db_features, _, db_labels = clustered
    first = CODE_FUNCTIONS[name](query_features, db_features, db_labels, BITS, 3)
    second = CODE_FUNCTIONS[name](query_features, db_features, db_labels, BITS, 3)
    other_seed = CODE_FUNCTIONS[name](query_features, db_features, db_labels, BITS, 4)

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other_seed[1])


@pytest.mark.parametrize("name", sorted(CODE_FUNCTIONS))
def test_codes_reject_bad_features(name, clustered):
    query_features, db_features, _, db_labels = clustered
    function = CODE_FUNCTIONS[name]
    with pytest.raises(ValueError, match="float32"):
        function(query_features.astype(np.float64), db_features, db_labels, BITS, 0)
    with pytest.raises(ValueError, match="numpy array"):
        function(query_features.tolist(), db_features, db_labels, BITS, 0)
    with pytest.raises(ValueError, match=r"shape \[n, dim\]"):
        function(query_features[0], db_features, db_labels, BITS, 0)
    with pytest.raises(ValueError, match="same feature dimension"):
        function(query_features[:, :10], db_features, db_labels, BITS, 0)
    with pytest.raises(ValueError, match="bits must be"):
        function(query_features, db_features, db_labels, 0, 0)

    broken = db_features.copy()
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        function(query_features, broken, db_labels, BITS, 0)


def test_itq_rejects_more_bits_than_dimensions(clustered):
    query_features, db_features, _, _ = clustered
    with pytest.raises(ValueError, match="feature dimension"):
        baselines.itq_codes(query_features[:, :8], db_features[:, :8], 12)


def test_linear_hash_rejects_bad_labels(clustered):
    query_features, db_features, _, db_labels = clustered
    with pytest.raises(ValueError, match="db_labels"):
        baselines.linear_hash_codes(query_features, db_features, db_labels[:-1], BITS)
    with pytest.raises(ValueError, match="integer dtype"):
        baselines.linear_hash_codes(query_features, db_features, db_labels.astype(np.float32), BITS)


# ---------------------------------------------------------------------------------------------
# ITQ internals


def test_itq_rotation_stays_orthogonal(clustered):
    _, db_features, _, _ = clustered
    model = baselines.fit_itq(db_features, BITS, seed=0, iterations=50)

    assert model.rotation.shape == (BITS, BITS)
    np.testing.assert_allclose(model.rotation.T @ model.rotation, np.eye(BITS), atol=1e-10)
    np.testing.assert_allclose(model.pca_components.T @ model.pca_components, np.eye(BITS), atol=1e-10)


def test_itq_quantization_error_does_not_increase(clustered):
    _, db_features, _, _ = clustered
    model = baselines.fit_itq(db_features, BITS, seed=1, iterations=50)
    errors = model.quantization_errors

    assert errors.shape == (51,)
    assert np.all(np.diff(errors) <= 1e-9 * errors[0])
    assert errors[-1] < errors[0]


def test_itq_encode_matches_itq_codes(clustered):
    query_features, db_features, _, _ = clustered
    model = baselines.fit_itq(db_features, BITS, seed=2)
    query_codes, db_codes = baselines.itq_codes(query_features, db_features, BITS, seed=2)

    np.testing.assert_array_equal(model.encode(query_features), query_codes)
    np.testing.assert_array_equal(model.encode(db_features), db_codes)


# ---------------------------------------------------------------------------------------------
# Linear supervised hash internals


def test_linear_hash_loss_decreases(clustered):
    _, db_features, _, db_labels = clustered
    model = baselines.fit_linear_hash(db_features, db_labels, BITS, seed=0, epochs=20, batch_size=64)

    assert model.epoch_losses.shape == (20,)
    assert np.all(np.isfinite(model.epoch_losses))
    assert model.epoch_losses[-1] < 0.7 * model.epoch_losses[0]
    assert model.kernel.shape == (db_features.shape[1], BITS)
    assert model.kernel.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Retrieval quality on separable data


def test_baselines_well_above_chance(baseline_maps):
    # Ten balanced classes: a random ranking has mAP close to 0.1.
    assert baseline_maps["lsh"] > 0.2
    assert baseline_maps["itq"] > 0.4
    assert baseline_maps["linear"] > 0.7


def test_baselines_ordering(baseline_maps):
    assert baseline_maps["linear"] > baseline_maps["itq"] + 0.05
    assert baseline_maps["itq"] > baseline_maps["lsh"] + 0.05


def test_cosine_above_chance(clustered):
    assert baselines.cosine_map_at_all(*clustered) > 0.5


# ---------------------------------------------------------------------------------------------
# Command line: aqhash_jax.run_baselines

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_run_all_baselines_and_table(clustered):
    query_features, db_features, query_labels, db_labels = clustered
    results = run_baselines.run_all_baselines(
        {"database": db_features, "query": query_features},
        {"database": db_labels, "query": query_labels},
        [8, 16],
        lsh_seeds=2,
        seed=0,
        linear_epochs=5,
    )

    assert results["cosine"]["map"] == pytest.approx(baselines.cosine_map_at_all(*clustered))
    for method in ("lsh", "itq", "linear"):
        assert sorted(results[method]) == ["16", "8"]
        for entry in results[method].values():
            assert 0.0 < entry["map_tie_aware"] <= 1.0
            assert 0.0 < entry["map_ranked"] <= 1.0
    assert len(results["lsh"]["8"]["map_tie_aware_per_seed"]) == 2
    assert results["lsh"]["8"]["map_tie_aware"] == pytest.approx(np.mean(results["lsh"]["8"]["map_tie_aware_per_seed"]))

    table = run_baselines.format_table(results, [8, 16], "synthetic")
    assert "| 8 |" in table
    assert "| 16 |" in table
    assert f"{results['itq']['16']['map_tie_aware']:.3f} / {results['itq']['16']['map_ranked']:.3f}" in table


def test_parse_bits_rejects_bad_values():
    assert run_baselines.parse_bits(["12", "24"]) == [12, 24]
    with pytest.raises(ValueError, match="integers"):
        run_baselines.parse_bits(["12", "x"])
    with pytest.raises(ValueError, match="at least 1"):
        run_baselines.parse_bits(["0"])
    with pytest.raises(ValueError, match="empty"):
        run_baselines.parse_bits([])


def write_image_folder(root, num_classes=3, train_per_class=8, test_per_class=3):
    """Write small JPEGs of distinct solid colours plus noise in the image-folder layout."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            colour = np.array([80 * label, 255 - 80 * label, 40 + 60 * label])
            for index in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")


def run_command(workdir, data_root, *extra):
    command = [
        sys.executable, "-m", "aqhash_jax.run_baselines",
        f"--config={REPO_ROOT / 'configs' / 'tiny.py'}",
        f"--config.data.root={data_root}",
        f"--workdir={workdir}",
        "--bits", "4,8",
        "--lsh_seeds=2",
        "--linear_epochs=3",
        "--batch_size=8",
        *extra,
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(workdir / "baselines.json", encoding="utf-8") as stream:
        return json.load(stream), completed.stdout


@pytest.mark.slow
def test_command_extracts_then_reuses_features(tmp_path):
    data_root = tmp_path / "images"
    write_image_folder(data_root)
    workdir = tmp_path / "run"

    report, stdout = run_command(workdir, data_root)
    assert report["features"]["database"]["source"] == "extracted"
    assert report["features"]["query"]["source"] == "extracted"
    assert report["num_database"] == 24
    assert report["num_query"] == 9
    assert report["bits"] == [4, 8]
    assert sorted(report["results"]["itq"]) == ["4", "8"]
    assert "| 8 |" in stdout
    assert (workdir / "baselines.md").read_text() in stdout

    database_features = np.load(workdir / "features_database.npy")
    assert database_features.dtype == np.float32
    assert database_features.shape == (24, report["feature_dim"])
    np.testing.assert_array_equal(np.load(workdir / "labels_query.npy"), np.repeat(np.arange(3), 3))

    second, _ = run_command(workdir, data_root)
    assert second["features"]["database"]["source"] == "saved"
    assert second["features"]["query"]["source"] == "saved"
    assert second["features"]["database"]["saved_by"]["source"] == "extracted"
    assert second["results"]["cosine"]["map"] == pytest.approx(report["results"]["cosine"]["map"])
    assert second["results"]["itq"]["8"] == pytest.approx(
        {**report["results"]["itq"]["8"], "seconds": second["results"]["itq"]["8"]["seconds"]}
    )


def test_cached_pooled_features_found(tmp_path):
    fields = {"backbone": "vit_ti16", "weights": "abc", "image_size": 32, "resize_size": 36,
              "mean": [127.5] * 3, "std": [127.5] * 3}
    paths = [f"/images/{index}.jpg" for index in range(10)]
    pooled = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float16)

    def extract_batches():
        for start in (0, 4, 8):
            rows = np.arange(start, start + 4)
            rows = np.where(rows < 10, rows, -1)
            view = {"feature_maps": [np.zeros((4, 2, 2, 3))], "pooled": pooled[np.clip(rows, 0, 9)]}
            yield rows, view, view

    cache_root = str(tmp_path / "cache")
    feature_cache.build_cache(cache_root, {**fields, "dtype": "float32", "conv_impl": "auto"}, paths, extract_batches)

    found = run_baselines.find_cached_pooled_features(cache_root, fields, [paths[7], paths[2]])
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found, pooled[[7, 2]].astype(np.float32))

    assert run_baselines.find_cached_pooled_features(cache_root, {**fields, "weights": "other"}, paths) is None
    assert run_baselines.find_cached_pooled_features(cache_root, fields, paths + ["/images/missing.jpg"]) is None
    assert run_baselines.find_cached_pooled_features(str(tmp_path / "absent"), fields, paths) is None
