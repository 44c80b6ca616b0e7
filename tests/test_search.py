"""Tests of the search command: exact scan, tie ranks, faiss indexes and contact sheets."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from test_encode import GALLERY_CLASSES, REPO, copy_gallery, shared_tiny_model

from aqhash_jax import encode, faiss_index, search
from aqhash_jax.retrieval import hamming_topk, load_codes, pack_codes, save_codes, unpack_codes


def clustered_codes(num_rows: int, code_length: int, *, num_clusters: int = 8, flip: float = 0.1, seed: int = 0) -> np.ndarray:
    """Return int8 [num_rows, code_length] {-1, +1} codes scattered around random cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, (num_clusters, code_length)).astype(bool)
    flips = rng.random((num_rows, code_length)) < flip
    bits = centres[rng.integers(0, num_clusters, num_rows)] ^ flips
    return np.where(bits, 1, -1).astype(np.int8)


def exact_distances(query_packed, db_packed, code_length):
    query = unpack_codes(query_packed, code_length)
    db = unpack_codes(db_packed, code_length)
    return (query[:, None, :] != db[None, :, :]).sum(axis=2)


def search_args(**overrides):
    values = dict(codes=None, query=None, workdir=None, query_codes=None, query_rows=None, topk=10, radius=None,
                  index=None, nprobe=None, ef_search=None, batch_size=16)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture()
def synthetic_db(tmp_path):
    codes = clustered_codes(500, 12, num_clusters=6, flip=0.05)
    path = tmp_path / "db.npy"
    save_codes(path, codes, paths=[f"/images/{i:04d}.jpg" for i in range(500)], fingerprint="f" * 64)
    return path


def test_tie_ranks_count_whole_database(synthetic_db):
    database = load_codes(synthetic_db)
    args = search_args(codes=str(synthetic_db), query_codes=str(synthetic_db), query_rows="0,7,123", topk=25)

    results, _, method = search.run_search(args)

    assert method == "exact scan"
    distances = exact_distances(database.packed[[0, 7, 123]], database.packed, 12)
    for row, result in enumerate(results):
        got = [(n.distance, n.index) for n in result.neighbours]
        expected = sorted((int(d), i) for i, d in enumerate(distances[row]))[:25]
        assert got == expected
        for neighbour in result.neighbours:
            assert neighbour.rank_first == int((distances[row] < neighbour.distance).sum()) + 1
            assert neighbour.rank_last == int((distances[row] <= neighbour.distance).sum())
        last = result.neighbours[-1]
        shown = sum(n.distance == last.distance for n in result.neighbours)
        assert result.tied_not_shown == int((distances[row] == last.distance).sum()) - shown


def test_radius_limits_results(synthetic_db):
    database = load_codes(synthetic_db)
    distances = exact_distances(database.packed[:2], database.packed, 12)

    limited, _, _ = search.run_search(search_args(codes=str(synthetic_db), query_codes=str(synthetic_db), query_rows="0,1", radius=1))
    everything, _, _ = search.run_search(
        search_args(codes=str(synthetic_db), query_codes=str(synthetic_db), query_rows="0,1", topk=0, radius=1)
    )

    for row in range(2):
        assert all(n.distance <= 1 for n in limited[row].neighbours)
        assert len(limited[row].neighbours) == min(10, int((distances[row] <= 1).sum()))
        assert sorted(n.index for n in everything[row].neighbours) == np.flatnonzero(distances[row] <= 1).tolist()


def test_format_marks_ties():
    db = SimpleNamespace(ids=None, paths=None)
    neighbours = [search._neighbour(db, 1, 1, 0, 4), search._neighbour(db, 2, 4, 1, 2), search._neighbour(db, 2, 4, 1, 9)]
    result = search.QueryResult("q.jpg", None, neighbours, True, tied_not_shown=1)

    text = search.format_results([result], code_length=12, num_db=20, method="exact scan")

    lines = text.splitlines()
    assert lines[2].split()[:2] == ["1", "0"]
    assert lines[3].split()[:3] == ["2-4", "1", "="]
    assert lines[4].split()[:3] == ["2-4", "1", "="]
    assert "(1 more database items at distance 1 not shown)" in lines[5]


@pytest.mark.parametrize("code_length", [5, 8, 12, 32, 64, 70])
def test_bytes_keep_bit_order(code_length):
    codes = clustered_codes(40, code_length, seed=code_length)
    packed = pack_codes(codes)

    code_bytes = faiss_index.packed_to_bytes(packed, code_length)

    expected = np.packbits(codes > 0, axis=1, bitorder="little")
    np.testing.assert_array_equal(code_bytes, expected)
    assert code_bytes.shape == (40, -(-code_length // 8))
    np.testing.assert_array_equal(faiss_index.bytes_to_packed(code_bytes, code_length), packed)


@pytest.mark.parametrize("code_length", [8, 12, 64, 70])
@pytest.mark.parametrize("index_type", faiss_index.INDEX_TYPES)
def test_faiss_distances_equal_exact(code_length, index_type, tmp_path):
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install faiss-cpu")
    codes = clustered_codes(2000, code_length, num_clusters=20, flip=0.08, seed=code_length)
    packed = pack_codes(codes)
    queries = pack_codes(clustered_codes(50, code_length, num_clusters=20, flip=0.08, seed=code_length + 1000))
    index = faiss_index.build_index(packed, code_length, index_type, nlist=16)
    faiss_index.save_index(index, tmp_path / "index.faiss", code_length=code_length,
                           codes_sha256=faiss_index.codes_digest(packed))
    loaded, metadata = faiss_index.load_index(tmp_path / "index.faiss")

    distances, indices = faiss_index.search_index(loaded, queries, code_length, 10, nprobe=16, ef_search=64)

    truth = exact_distances(queries, packed, code_length)
    assert metadata["index_type"] == index_type
    assert (indices >= 0).all()
    np.testing.assert_array_equal(distances, np.take_along_axis(truth, indices, axis=1))
    exact_d, exact_i = hamming_topk(queries, packed, code_length, 10)
    if index_type in ("flat", "ivf"):
        # Flat scans everything and IVF with nprobe == nlist visits every list, so the distance lists
        # are exact. IVF keeps other members of the last tie group than the exact scan's lowest rows.
        np.testing.assert_array_equal(distances, exact_d)
    if index_type == "flat":
        np.testing.assert_array_equal(indices, exact_i)


def test_index_search_reports_open_ties(synthetic_db, tmp_path):
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install faiss-cpu")
    search.build_index_command(str(synthetic_db), str(tmp_path / "db.faiss"), "flat", hnsw_m=16, ef_construction=40,
                               nlist=None, nprobe=4, ef_search=64)
    args = dict(codes=str(synthetic_db), query_codes=str(synthetic_db), query_rows="3", topk=10)

    exact, _, _ = search.run_search(search_args(**args))
    indexed, _, method = search.run_search(search_args(index=str(tmp_path / "db.faiss"), **args))

    assert method == "faiss flat index"
    assert [(n.distance, n.index) for n in indexed[0].neighbours] == [(n.distance, n.index) for n in exact[0].neighbours]
    assert indexed[0].neighbours[-1].open_end
    assert not indexed[0].ranks_exact


def test_index_from_other_codes_rejected(synthetic_db, tmp_path):
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install faiss-cpu")
    other = tmp_path / "other.npy"
    save_codes(other, clustered_codes(500, 12, seed=5))
    search.build_index_command(str(other), str(tmp_path / "other.faiss"), "flat", hnsw_m=16, ef_construction=40,
                               nlist=None, nprobe=4, ef_search=64)

    with pytest.raises(ValueError, match="built from other codes"):
        search.run_search(search_args(codes=str(synthetic_db), query_codes=str(synthetic_db), query_rows="0",
                                      index=str(tmp_path / "other.faiss")))


def test_missing_faiss_names_install_command(monkeypatch):
    real_import = builtins.__import__

    def import_without_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", import_without_faiss)

    with pytest.raises(faiss_index.FaissMissingError, match=r"pip install \"aqhash_jax\[faiss\]\""):
        faiss_index.build_index(pack_codes(clustered_codes(4, 8)), 8)


def test_code_length_mismatch_rejected(synthetic_db, tmp_path):
    queries = tmp_path / "queries16.npy"
    save_codes(queries, clustered_codes(3, 16))
    raw_queries = tmp_path / "raw16.npy"
    np.save(raw_queries, clustered_codes(3, 16))

    for path in (queries, raw_queries):
        with pytest.raises(ValueError, match="code length 16 .* have 12"):
            search.run_search(search_args(codes=str(synthetic_db), query_codes=str(path)))

    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.search", "--codes", str(synthetic_db), "--query-codes", str(queries)],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: query codes")


def test_query_input_errors(synthetic_db):
    base = dict(codes=str(synthetic_db))
    with pytest.raises(search.SearchError, match="pass --workdir"):
        search.run_search(search_args(query=["/images/q.jpg"], **base))
    with pytest.raises(search.SearchError, match="outside"):
        search.run_search(search_args(query_codes=str(synthetic_db), query_rows="0,500", **base))
    with pytest.raises(search.SearchError, match="not an integer"):
        search.run_search(search_args(query_codes=str(synthetic_db), query_rows="0,x", **base))
    with pytest.raises(search.SearchError, match="no queries"):
        search.run_search(search_args(**base))
    with pytest.raises(search.SearchError, match="pass --radius"):
        search.run_search(search_args(query_codes=str(synthetic_db), topk=0, **base))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A flowers12 gallery encoded with the tiny trained model."""
    workdir = shared_tiny_model(tmp_path_factory)
    folder = copy_gallery(tmp_path_factory.mktemp("search_gallery"), per_class=8)
    codes = folder.parent / "gallery.npy"
    encode.encode_collection(encode.load_encoder(workdir), [str(folder)], str(codes), progress=False)
    return SimpleNamespace(workdir=workdir, folder=folder, codes=codes)


@pytest.mark.slow
def test_database_image_finds_itself(gallery):
    database = load_codes(gallery.codes)
    query = str(gallery.folder / GALLERY_CLASSES[1] / sorted(os.listdir(gallery.folder / GALLERY_CLASSES[1]))[3])

    results, _, _ = search.run_search(
        search_args(codes=str(gallery.codes), query=[query], workdir=str(gallery.workdir), topk=0, radius=0)
    )

    own_row = database.paths.index(query)
    own = [n for n in results[0].neighbours if n.index == own_row]
    assert len(own) == 1
    assert own[0].distance == 0
    assert own[0].rank_first == 1
    assert own[0].path == query


@pytest.mark.slow
def test_cli_json_and_sheet(gallery, tmp_path):
    query = str(gallery.folder / GALLERY_CLASSES[0] / sorted(os.listdir(gallery.folder / GALLERY_CLASSES[0]))[0])
    sheet_path = tmp_path / "sheet.png"

    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.search", "--codes", str(gallery.codes), "--query", query,
         "--workdir", str(gallery.workdir), "--topk", "24", "--json", "--sheet", str(sheet_path),
         "--query-codes", str(gallery.codes), "--query-rows", "5"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    assert [q["query"] for q in output["queries"]] == [query, load_codes(gallery.codes).paths[5]]
    first = output["queries"][0]["results"]
    assert len(first) == 24
    assert query in [r["path"] for r in first if r["distance"] == 0]
    assert [(r["distance"], r["row"]) for r in first] == sorted((r["distance"], r["row"]) for r in first)
    with Image.open(sheet_path) as image:
        assert image.size == (8 + 25 * (128 + 8) + 8, 8 + 2 * (128 + 2 * 12 + 8))


@pytest.mark.slow
def test_other_model_rejected(gallery, tmp_path):
    database = load_codes(gallery.codes)
    other = tmp_path / "other.npy"
    save_codes(other, database.packed, code_length=8, paths=database.paths, fingerprint="0" * 64)
    query = database.paths[0]

    with pytest.raises(search.SearchError, match="fingerprint"):
        search.run_search(search_args(codes=str(other), query=[query], workdir=str(gallery.workdir)))
