"""Code files: save, load, validation errors and fingerprints."""

import json

import numpy as np
import pytest

from aqhash_jax.retrieval import check_compatible, compute_fingerprint, load_codes, pack_codes, save_codes
from aqhash_jax.retrieval import export


def _codes(rows=10, bits=24, seed=0):
    return np.random.default_rng(seed).choice([-1, 1], size=(rows, bits)).astype(np.int8)


def test_round_trip_with_metadata(tmp_path):
    codes = _codes()
    path = str(tmp_path / "db.npy")
    fingerprint = compute_fingerprint({"bits": 24, "backbone": "resnet50"})
    sidecar = save_codes(
        path, codes, ids=list(range(10)), paths=[f"img{i}.jpg" for i in range(10)], labels=np.arange(10) % 3,
        split="database", fingerprint=fingerprint, extra={"epoch": 3},
    )
    assert sidecar == path + ".json"

    loaded = load_codes(path)
    np.testing.assert_array_equal(loaded.signs(), codes)
    np.testing.assert_array_equal(loaded.packed, pack_codes(codes))
    np.testing.assert_array_equal(loaded.labels, np.arange(10) % 3)
    assert loaded.code_length == 24
    assert loaded.ids == list(range(10))
    assert loaded.paths[3] == "img3.jpg"
    assert loaded.split == "database"
    assert loaded.fingerprint == fingerprint
    assert loaded.metadata["extra"] == {"epoch": 3}
    assert loaded.metadata["bit_order"] == "lsb_first"
    assert loaded.metadata["created"].endswith("+00:00")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_packed_input_and_large_labels_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "INLINE_LABEL_LIMIT", 5)
    codes = _codes(rows=8, bits=40)
    labels = np.random.default_rng(1).random((8, 6)) < 0.5
    path = str(tmp_path / "q.npy")
    save_codes(path, pack_codes(codes), code_length=40, labels=labels)

    metadata = json.loads((tmp_path / "q.npy.json").read_text())
    assert metadata["labels_file"] == "q.npy.labels.npy"
    assert "labels" not in metadata
    loaded = load_codes(path)
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.signs(), codes)


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="end with .npy"):
        save_codes(str(tmp_path / "codes.bin"), _codes())
    with pytest.raises(ValueError, match="code_length"):
        save_codes(str(tmp_path / "codes.npy"), pack_codes(_codes()))
    with pytest.raises(ValueError, match="ids has 3 entries but there are 10"):
        save_codes(str(tmp_path / "codes.npy"), _codes(), ids=[1, 2, 3])
    with pytest.raises(ValueError, match="sign_codes"):
        save_codes(str(tmp_path / "codes.npy"), np.zeros((2, 4), np.float32))
    assert not (tmp_path / "codes.npy").exists()


def _saved(tmp_path):
    path = str(tmp_path / "c.npy")
    save_codes(path, _codes(), labels=np.zeros(10, int))
    return path


def _rewrite_sidecar(path, **changes):
    with open(path + ".json") as handle:
        metadata = json.load(handle)
    metadata.update(changes)
    with open(path + ".json", "w") as handle:
        json.dump(metadata, handle)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_rows": 11}, "10 rows but the sidecar says num_rows=11"),
        ({"code_length": 40}, "1 words per row but code_length=40 needs 2"),
        ({"code_length": 20}, "nonzero bits above code length 20"),
        ({"format_version": 9}, "format_version is 9"),
        ({"bit_order": "msb_first"}, "bit_order is 'msb_first'"),
        ({"ids": [1, 2]}, "2 ids for 10 rows"),
        ({"labels": [0, 1]}, "labels have shape"),
        ({"format": "other"}, "expected 'aqhash_codes'"),
    ],
)
def test_load_rejects_sidecar_mismatch(tmp_path, changes, message):
    path = _saved(tmp_path)
    _rewrite_sidecar(path, **changes)
    with pytest.raises(ValueError, match=message) as raised:
        load_codes(path)
    assert path in str(raised.value)


def test_load_rejects_wrong_dtype_and_missing_sidecar(tmp_path):
    path = _saved(tmp_path)
    np.save(path, pack_codes(_codes()).astype(np.int64))
    with pytest.raises(ValueError, match="dtype is int64, expected uint32"):
        load_codes(path)
    with pytest.raises(ValueError, match="sidecar .* not found"):
        load_codes(str(tmp_path / "missing.npy"))
    (tmp_path / "broken.npy.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read sidecar"):
        load_codes(str(tmp_path / "broken.npy"))


def test_check_compatible(tmp_path):
    save_codes(str(tmp_path / "a.npy"), _codes(bits=24))
    save_codes(str(tmp_path / "b.npy"), _codes(bits=24, seed=1))
    save_codes(str(tmp_path / "c.npy"), _codes(bits=32))
    check_compatible(load_codes(str(tmp_path / "a.npy")), load_codes(str(tmp_path / "b.npy")))
    with pytest.raises(ValueError, match="code length 24 but database codes .* have 32"):
        check_compatible(load_codes(str(tmp_path / "a.npy")), load_codes(str(tmp_path / "c.npy")))


def test_fingerprint_is_stable():
    first = compute_fingerprint({"b": 1, "a": [1, 2], "c": np.int64(3)})
    second = compute_fingerprint({"c": 3, "a": [1, 2], "b": 1})
    assert first == second
    assert len(first) == 64
    assert compute_fingerprint(b"abc") == compute_fingerprint("abc")
    assert compute_fingerprint({"a": 1}) != compute_fingerprint({"a": 2})
    with pytest.raises(ValueError, match="compute_fingerprint takes"):
        compute_fingerprint(3.5)
    with pytest.raises(ValueError, match="cannot fingerprint"):
        compute_fingerprint({"a": object()})
