"""Command line `python -m aqhash_jax.evaluate`, run in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aqhash_jax.retrieval import retrieval_metrics, save_codes

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*arguments):
    environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "aqhash_jax.evaluate", *arguments], capture_output=True, text=True,
        env=environment, timeout=300, check=False,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    arrays = {
        "query": rng.choice([-1, 1], size=(25, 16)).astype(np.int8),
        "db": rng.integers(0, 2, size=(120, 16)),
        "query_labels": rng.integers(0, 4, size=25),
        "db_labels": rng.integers(0, 4, size=120),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = str(folder / f"{name}.npy")
        np.save(paths[name], array)
    paths["db_export"] = str(folder / "db_export.npy")
    save_codes(paths["db_export"], arrays["db"], labels=arrays["db_labels"])
    paths["db_24"] = str(folder / "db_24.npy")
    save_codes(paths["db_24"], rng.integers(0, 2, size=(120, 24)), labels=arrays["db_labels"])
    return paths, arrays


def test_json_output_matches_library(files):
    paths, arrays = files
    completed = _run(
        "--query-codes", paths["query"], "--db-codes", paths["db"], "--query-labels", paths["query_labels"],
        "--db-labels", paths["db_labels"], "--topk", "30", "--json",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    for key in ("map", "map_at_k", "precision_at_k", "precision_within_radius", "num_queries", "num_queries_without_relevant"):
        assert key in results
    expected = retrieval_metrics(arrays["query"], arrays["db"], arrays["query_labels"], arrays["db_labels"], topk=30)
    assert results["map"] == pytest.approx(expected["map"], abs=1e-12)
    assert results["num_queries"] == 25


def test_exported_db_with_sidecar_labels_and_ranked(files):
    paths, arrays = files
    completed = _run(
        "--query-codes", paths["query"], "--db-codes", paths["db_export"], "--query-labels", paths["query_labels"],
        "--ranking", "ranked", "--method", "matmul", "--json",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    expected = retrieval_metrics(
        arrays["query"], arrays["db"], arrays["query_labels"], arrays["db_labels"], ranking="ranked"
    )
    assert results["ranking"] == "ranked"
    assert results["map"] == pytest.approx(expected["map"], abs=1e-9)


def test_table_output(files):
    paths, _ = files
    completed = _run(
        "--query-codes", paths["query"], "--db-codes", paths["db_export"], "--query-labels", paths["query_labels"],
    )
    assert completed.returncode == 0, completed.stderr
    assert "mAP@all" in completed.stdout
    assert "precision within radius 2" in completed.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--db-codes", "DB_24", "--query-labels", "QUERY_LABELS"], "code length 16 but database codes"),
        (["--db-codes", "MISSING"], "not found"),
        (["--db-codes", "DB", "--query-labels", "QUERY_LABELS"], "no database labels"),
        (["--db-codes", "DB_EXPORT", "--ranking", "sorted"], "--ranking"),
        (["--db-codes", "DB_EXPORT", "--query-labels", "QUERY_LABELS", "--radius", "40"], "radius must be"),
    ],
)
def test_bad_input_exits_2(files, arguments, message):
    paths, _ = files
    substitutions = {
        "DB_24": paths["db_24"], "QUERY_LABELS": paths["query_labels"], "DB": paths["db"],
        "DB_EXPORT": paths["db_export"], "MISSING": paths["db"] + ".missing.npy",
    }
    arguments = [substitutions.get(argument, argument) for argument in arguments]
    completed = _run("--query-codes", paths["query"], *arguments)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""
