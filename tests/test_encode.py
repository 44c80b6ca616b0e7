"""Tests of the gallery encode command on flowers12 images with a tiny trained model."""

from __future__ import annotations

import logging as python_logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aqhash_jax import encode
from aqhash_jax.retrieval.export import load_codes, save_codes

REPO = Path(__file__).resolve().parents[1]
GALLERY_CLASSES = ("bluebell", "buttercup", "daisy")

pytestmark = pytest.mark.slow


def shared_data_root() -> Path:
    """Return the shared data folder (env AQHASH_SHARED_DATA overrides the default next to the repo)."""
    return Path(os.environ.get("AQHASH_SHARED_DATA", REPO.parent / "shared" / "data"))


def flowers_root() -> Path:
    root = shared_data_root() / "flowers12"
    if not (root / "train").is_dir():
        pytest.skip(f"flowers12 not found at {root}; set AQHASH_SHARED_DATA to the shared data folder")
    return root


def shared_tiny_model(tmp_path_factory) -> Path:
    """Train configs/tiny.py on a 3-class flowers12 subset once per session; return the workdir.

    The subset is a folder of symbolic links, so no image is copied. The workdir lives under the
    session's base temporary folder, so test files that call this share one trained model.
    """
    root = flowers_root()
    base = tmp_path_factory.getbasetemp()
    workdir = base / "tiny_model"
    if (workdir / "export" / "model.msgpack").exists():
        return workdir

    subset = base / "flowers_subset"
    for split in ("train", "test"):
        for name in GALLERY_CLASSES:
            (subset / split).mkdir(parents=True, exist_ok=True)
            link = subset / split / name
            if not link.exists():
                link.symlink_to(root / split / name, target_is_directory=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [
        sys.executable, "-m", "aqhash_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
        f"--workdir={workdir}", f"--config.data.root={subset}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def copy_gallery(target: Path, classes=GALLERY_CLASSES, per_class: int = 20) -> Path:
    """Copy the first `per_class` train images of each class to `target/<class>/` (a temporary folder)."""
    root = flowers_root()
    for name in classes:
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((root / "train" / name).glob("*.jpg"))[:per_class]:
            shutil.copy2(path, folder / path.name)
    return target


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def encoder(workdir):
    return encode.load_encoder(workdir)


def run_encode(encoder, inputs, out, **kwargs):
    return encode.encode_collection(encoder, [os.fspath(p) for p in inputs], os.fspath(out), progress=False, **kwargs)


def test_collect_paths_walks_folders(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/one.jpg", "a/deep/two.PNG", "a/notes.txt", "a/.three.jpg", ".hidden/four.jpg", "single.dat"):
        (tmp_path / name).write_bytes(b"x")

    found = encode.collect_image_paths([tmp_path, tmp_path / "single.dat", tmp_path / "a" / "one.jpg"])

    assert found == sorted([
        str(tmp_path / "a" / "one.jpg"), str(tmp_path / "a" / "deep" / "two.PNG"), str(tmp_path / "single.dat"),
    ])
    with pytest.raises(encode.EncodeError, match="not found"):
        encode.collect_image_paths([tmp_path / "missing"])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_bytes(b"x")
    with pytest.raises(encode.EncodeError, match="no image files"):
        encode.collect_image_paths([tmp_path / "text"])


def test_codes_match_training_export(encoder, workdir, tmp_path):
    """The encode path preprocesses like training's evaluation, so codes equal the exported ones."""
    database = load_codes(workdir / "export" / "database_codes.npy")
    row_of = {(Path(p).parent.name, Path(p).name): row for row, p in enumerate(database.paths)}
    gallery = copy_gallery(tmp_path / "gallery", per_class=12)

    summary = run_encode(encoder, [gallery], tmp_path / "codes.npy")
    codes = load_codes(tmp_path / "codes.npy")

    assert summary.num_rows == 36
    assert codes.fingerprint == database.fingerprint
    assert codes.code_length == database.code_length == 8
    rows = [row_of[(Path(p).parent.name, Path(p).name)] for p in codes.paths]
    np.testing.assert_array_equal(codes.packed, database.packed[rows])
    assert codes.ids == list(range(36))
    assert codes.paths == sorted(codes.paths)
    assert codes.metadata["extra"]["image_size"] == 32


def test_append_equals_full_encode(encoder, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:2], per_class=10)
    appended = tmp_path / "appended.npy"
    first = run_encode(encoder, [gallery], appended)
    copy_gallery(gallery, classes=GALLERY_CLASSES[2:], per_class=10)
    # A file sorting before the old ones checks that new rows are merged in path order.
    shutil.copy2(gallery / "daisy" / sorted(os.listdir(gallery / "daisy"))[0], gallery / "aaa_first.jpg")

    second = run_encode(encoder, [gallery], appended)
    full = run_encode(encoder, [gallery], tmp_path / "full.npy")

    assert first.num_rows == 20
    assert len(second.encoded) == 11
    assert second.reused == 20
    assert full.num_rows == second.num_rows == 31
    appended_codes, full_codes = load_codes(appended), load_codes(tmp_path / "full.npy")
    np.testing.assert_array_equal(appended_codes.packed, full_codes.packed)
    assert appended_codes.paths == full_codes.paths
    assert appended_codes.ids == full_codes.ids
    for key in ("file_sizes", "file_mtimes_ns"):
        assert appended_codes.metadata["extra"][key] == full_codes.metadata["extra"][key]
    assert appended_codes.paths[0] == str(gallery / "aaa_first.jpg")


def test_rerun_without_changes_keeps_file(encoder, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:1], per_class=4)
    out = tmp_path / "codes.npy"
    run_encode(encoder, [gallery], out)
    before = (out.stat().st_mtime_ns, (tmp_path / "codes.npy.json").read_text())

    summary = run_encode(encoder, [gallery], out)

    assert not summary.written
    assert summary.encoded == []
    assert (out.stat().st_mtime_ns, (tmp_path / "codes.npy.json").read_text()) == before


def test_changed_file_is_reencoded(encoder, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES, per_class=2)
    out = tmp_path / "codes.npy"
    run_encode(encoder, [gallery], out)
    before = load_codes(out)
    target = gallery / "bluebell" / sorted(os.listdir(gallery / "bluebell"))[0]
    donor = gallery / "daisy" / sorted(os.listdir(gallery / "daisy"))[0]
    shutil.copyfile(donor, target)
    os.utime(target, ns=(before.metadata["extra"]["file_mtimes_ns"][0] + 10**9,) * 2)

    summary = run_encode(encoder, [gallery], out)
    after = load_codes(out)

    assert summary.changed == [str(target)]
    assert summary.encoded == [str(target)]
    assert after.paths == before.paths
    row_of = {path: row for row, path in enumerate(after.paths)}
    np.testing.assert_array_equal(after.packed[row_of[str(target)]], after.packed[row_of[str(donor)]])
    assert after.metadata["extra"]["file_sizes"][row_of[str(target)]] == donor.stat().st_size


def test_corrupt_files_skipped_and_named(encoder, tmp_path, caplog):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:1], per_class=3)
    (gallery / "bluebell" / "garbage.jpg").write_bytes(b"this is not an image")
    good = sorted((gallery / "bluebell").glob("image_*.jpg"))[0]
    (gallery / "bluebell" / "truncated.jpg").write_bytes(good.read_bytes()[:200])

    with caplog.at_level(python_logging.WARNING):
        summary = run_encode(encoder, [gallery], tmp_path / "codes.npy")

    failed = sorted(item.path for item in summary.failed)
    assert failed == [str(gallery / "bluebell" / "garbage.jpg"), str(gallery / "bluebell" / "truncated.jpg")]
    assert all(item.reason for item in summary.failed)
    codes = load_codes(tmp_path / "codes.npy")
    assert codes.num_rows == 3
    assert str(gallery / "bluebell" / "garbage.jpg") not in codes.paths
    warning = "\n".join(record.getMessage() for record in caplog.records if record.levelno >= python_logging.WARNING)
    assert "Skipped 2 unreadable image files" in warning
    assert "garbage.jpg" in warning
    assert "truncated.jpg" in warning


def test_rejects_other_model_or_length(encoder, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:1], per_class=2)
    out = tmp_path / "codes.npy"
    run_encode(encoder, [gallery], out)
    existing = load_codes(out)
    save_codes(out, existing.packed, code_length=8, ids=existing.ids, paths=existing.paths,
               fingerprint="0" * 64, extra=existing.metadata["extra"])

    with pytest.raises(encode.EncodeError, match="fingerprint .*--overwrite"):
        run_encode(encoder, [gallery], out)

    save_codes(out, np.ones((2, 16), dtype=np.int8), paths=existing.paths, fingerprint=encoder.fingerprint,
               extra=existing.metadata["extra"])
    with pytest.raises(encode.EncodeError, match="16-bit codes .*--overwrite"):
        run_encode(encoder, [gallery], out)

    summary = run_encode(encoder, [gallery], out, overwrite=True)
    assert summary.num_rows == 2
    np.testing.assert_array_equal(load_codes(out).packed, existing.packed)


def test_failure_keeps_old_file(encoder, tmp_path, monkeypatch):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:1], per_class=2)
    out = tmp_path / "codes.npy"
    run_encode(encoder, [gallery], out)
    before = (out.read_bytes(), (tmp_path / "codes.npy.json").read_bytes())
    copy_gallery(gallery, classes=GALLERY_CLASSES[1:2], per_class=2)

    def fail_after_array(path, *args, **kwargs):
        np.save(path, np.zeros((1, 1), np.uint32))
        raise OSError("disk full")

    monkeypatch.setattr(encode, "save_codes", fail_after_array)
    with pytest.raises(OSError, match="disk full"):
        run_encode(encoder, [gallery], out)

    assert (out.read_bytes(), (tmp_path / "codes.npy.json").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["codes.npy", "codes.npy.json", "gallery"]


def test_prune_missing_drops_rows(encoder, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES[:2], per_class=2)
    out = tmp_path / "codes.npy"
    run_encode(encoder, [gallery], out)
    shutil.rmtree(gallery / "bluebell")

    kept = run_encode(encoder, [gallery], out)
    assert not kept.written
    assert load_codes(out).num_rows == 4

    pruned = run_encode(encoder, [gallery], out, prune_missing=True)
    assert len(pruned.pruned) == 2
    assert [Path(p).parent.name for p in load_codes(out).paths] == ["buttercup", "buttercup"]


def test_cli_on_eight_devices_matches(encoder, workdir, tmp_path):
    gallery = copy_gallery(tmp_path / "gallery", classes=GALLERY_CLASSES, per_class=4)
    run_encode(encoder, [gallery], tmp_path / "one.npy", batch_size=5)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")

    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.encode", f"--workdir={workdir}", "--images", str(gallery / "bluebell"),
         str(gallery / "buttercup"), str(gallery / "daisy"), "--out", str(tmp_path / "eight.npy"), "--batch-size", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "in batches of 8 over 8 devices" in result.stderr
    assert "img/s" in result.stderr
    assert "12 rows; encoded 12" in result.stdout
    one, eight = load_codes(tmp_path / "one.npy"), load_codes(tmp_path / "eight.npy")
    assert eight.paths == one.paths
    np.testing.assert_array_equal(eight.packed, one.packed)


def test_cli_reports_bad_input(workdir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.encode", f"--workdir={workdir}", "--images", str(tmp_path / "missing"),
         "--out", str(tmp_path / "codes.npy")],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 2
    assert f"error: image input {tmp_path / 'missing'} not found" in result.stderr
