"""Tests for aqhash_jax.data.pipeline: batches, determinism, resume, sharding, padding."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aqhash_jax.data import images, pipeline, sources

SHARED_DATA = Path(os.environ.get("AQHASH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CUB100 = SHARED_DATA / "cub100"
FLOWERS12 = SHARED_DATA / "flowers12"

MEAN = (127.5, 127.5, 127.5)
STD = (127.5, 127.5, 127.5)
SIZE = 32


def _save(image: Image.Image, path: Path, image_format: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    path.write_bytes(buffer.getvalue())


def _tree(root: Path, classes=4, train=5, test=3) -> Path:
    """Write root/<split>/<class>/<k>.jpg with distinct random pixels and varied sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for k in range(count):
                width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                _save(Image.fromarray(pixels), folder / f"{k}.jpg", "JPEG")
    return root


def _splits(root: Path, **overrides) -> sources.RetrievalSplits:
    config = sources.default_data_config()
    config.source = "image_folder"
    config.root = str(root)
    for key, value in overrides.items():
        setattr(config, key, value)
    return sources.load_retrieval_splits(config)


def _train_loader(split, **overrides):
    kwargs = dict(global_batch_size=4, image_size=SIZE, mean=MEAN, std=STD, seed=7, shard_index=0, shard_count=1)
    kwargs.update(overrides)
    return pipeline.make_train_loader(split, **kwargs)


def _eval_loader(split, **overrides):
    kwargs = dict(
        global_batch_size=8, image_size=SIZE, resize_size=36, mean=MEAN, std=STD, shard_index=0, shard_count=1
    )
    kwargs.update(overrides)
    return pipeline.make_eval_loader(split, **kwargs)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batch_shapes_dtypes_ranges(tmp_path):
    splits = _splits(_tree(tmp_path))
    batch = next(iter(_train_loader(splits.train)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,)
    assert batch["label"].dtype == np.int32
    assert batch["index"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_
    assert batch["mask"].all()
    assert batch["image"].min() >= -1.0
    assert batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.2
    np.testing.assert_array_equal(batch["label"], splits.train.labels[batch["index"]])


def test_train_epoch_covers_split_once(tmp_path):
    splits = _splits(_tree(tmp_path))
    batches = list(_train_loader(splits.train, num_epochs=1))
    assert len(batches) == 5
    indices = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(np.sort(indices), np.arange(20))
    assert not np.array_equal(indices, np.arange(20))


def test_train_is_deterministic_per_seed(tmp_path):
    splits = _splits(_tree(tmp_path))
    first = _take(iter(_train_loader(splits.train)), 7)
    again = _take(iter(_train_loader(splits.train)), 7)
    other = _take(iter(_train_loader(splits.train, seed=8)), 7)
    _assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["index"], other[0]["index"])


def test_train_epochs_differ(tmp_path):
    splits = _splits(_tree(tmp_path))
    batches = list(_train_loader(splits.train, num_epochs=2))
    assert len(batches) == 10
    first = np.concatenate([b["index"] for b in batches[:5]])
    second = np.concatenate([b["index"] for b in batches[5:]])
    np.testing.assert_array_equal(np.sort(second), np.arange(20))
    assert not np.array_equal(first, second)


def test_augmentation_varies_and_eval_mode_does_not(tmp_path):
    splits = _splits(_tree(tmp_path, classes=1, train=1, test=1))
    single = splits.train
    loader = _train_loader(single, global_batch_size=1, shuffle=False)
    views = [b["image"][0] for b in _take(iter(loader), 4)]
    assert any(not np.array_equal(views[0], v) for v in views[1:])

    plain = _train_loader(single, global_batch_size=1, shuffle=False, augment=False, resize_size=36)
    plain_views = [b["image"][0] for b in _take(iter(plain), 3)]
    for view in plain_views[1:]:
        np.testing.assert_array_equal(view, plain_views[0])


def test_train_resume_from_iterator_state(tmp_path):
    splits = _splits(_tree(tmp_path))
    iterator = iter(_train_loader(splits.train))
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 4)

    resumed = iter(_train_loader(splits.train))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)


def test_train_host_shards_are_disjoint_and_cover(tmp_path):
    splits = _splits(_tree(tmp_path))
    per_host = []
    for shard_index in range(2):
        loader = _train_loader(splits.train, num_epochs=1, shard_index=shard_index, shard_count=2)
        batches = list(loader)
        assert len(batches) == 5
        assert all(b["image"].shape[0] == 2 for b in batches)
        per_host.append(np.concatenate([b["index"] for b in batches]))
    assert not set(per_host[0]) & set(per_host[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(per_host)), np.arange(20))


def test_train_host_shards_interleave_single_host_stream(tmp_path):
    splits = _splits(_tree(tmp_path))
    single = np.concatenate([b["index"] for b in _train_loader(splits.train, num_epochs=1)])
    host0 = np.concatenate([b["index"] for b in _train_loader(splits.train, num_epochs=1, shard_index=0, shard_count=2)])
    np.testing.assert_array_equal(host0, single[0::2])


def test_default_shards_from_jax_process(tmp_path):
    splits = _splits(_tree(tmp_path))
    loader = pipeline.make_train_loader(
        splits.train, global_batch_size=4, image_size=SIZE, mean=MEAN, std=STD, seed=0, num_epochs=1
    )
    assert len(list(loader)) == 5


def test_train_batch_must_divide_hosts(tmp_path):
    splits = _splits(_tree(tmp_path))
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        _train_loader(splits.train, global_batch_size=4, shard_index=0, shard_count=3)


def test_train_rejects_bad_normalization(tmp_path):
    splits = _splits(_tree(tmp_path))
    with pytest.raises(ValueError, match="multiply values given for \\[0, 1\\] inputs by 255"):
        _train_loader(splits.train, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="3 values"):
        _train_loader(splits.train, mean=(127.5,), std=(127.5,))


@pytest.mark.slow
def test_worker_processes_match_in_process(tmp_path):
    splits = _splits(_tree(tmp_path))
    in_process = list(_train_loader(splits.train, num_epochs=1))
    with_workers = list(_train_loader(splits.train, num_epochs=1, worker_count=2))
    _assert_batches_equal(with_workers, in_process)

    eval_in_process = list(_eval_loader(splits.query, global_batch_size=4))
    eval_with_workers = list(_eval_loader(splits.query, global_batch_size=4, worker_count=2))
    _assert_batches_equal(eval_with_workers, eval_in_process)


def test_eval_pads_last_batch_and_keeps_order(tmp_path):
    splits = _splits(_tree(tmp_path))
    batches = list(_eval_loader(splits.query))
    assert len(batches) == 2
    assert all(b["image"].shape == (8, SIZE, SIZE, 3) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(mask, [True] * 12 + [False] * 4)
    np.testing.assert_array_equal(index[:12], np.arange(12))
    np.testing.assert_array_equal(index[12:], [-1] * 4)
    assert np.all(batches[1]["image"][4:] == 0)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[:12], splits.query.labels)


def test_eval_matches_direct_preprocessing(tmp_path):
    splits = _splits(_tree(tmp_path))
    batch = next(iter(_eval_loader(splits.query)))
    data = splits.query[3]["image"]
    width, height = images.image_size(data)
    expected = images.decode_crop(data, images.center_crop_box(width, height, SIZE, 36), SIZE)
    np.testing.assert_allclose(batch["image"][3], (expected.astype(np.float32) - 127.5) / 127.5, atol=1e-6)


def test_eval_host_shards_cover_once(tmp_path):
    splits = _splits(_tree(tmp_path))
    seen = []
    counts = []
    for shard_index in range(2):
        batches = list(_eval_loader(splits.query, shard_index=shard_index, shard_count=2))
        counts.append(len(batches))
        index = np.concatenate([b["index"][b["mask"]] for b in batches])
        expected_rows = pipeline.eval_shard_indices(len(splits.query), 8, shard_index, 2)
        np.testing.assert_array_equal(index, expected_rows)
        seen.append(index)
    assert counts[0] == counts[1] == 2
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(12))


def test_eval_shard_geometry():
    shards = [pipeline.eval_shard(10, 4, i, 4) for i in range(4)]
    assert [s.num_batches for s in shards] == [3, 3, 3, 3]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(s.padded_length == 3 for s in shards)


def test_iterate_decoded_with_flip(tmp_path):
    splits = _splits(_tree(tmp_path))
    batches = list(
        pipeline.iterate_decoded(
            splits.query, batch_size=8, image_size=SIZE, resize_size=36, mean=MEAN, std=STD, flip=True,
            shard_index=0, shard_count=1,
        )
    )
    assert len(batches) == 2
    for batch in batches:
        assert batch["image_flipped"].shape == batch["image"].shape
        np.testing.assert_array_equal(batch["image_flipped"], batch["image"][:, :, ::-1])


def test_decode_failure_is_masked(tmp_path):
    root = _tree(tmp_path)
    (root / "test" / "class_0" / "1.jpg").write_bytes(b"truncated or garbage bytes")
    splits = _splits(root, validate="off")
    batch = next(iter(_eval_loader(splits.query)))
    np.testing.assert_array_equal(batch["mask"], [True, False] + [True] * 6)
    assert np.all(batch["image"][1] == 0)
    assert batch["index"][1] == 1

    train_batches = list(_train_loader(splits.query, num_epochs=1, global_batch_size=12))
    assert train_batches[0]["mask"].sum() == 11


def test_decode_failure_raises_in_strict_mode(tmp_path):
    root = _tree(tmp_path)
    (root / "test" / "class_0" / "1.jpg").write_bytes(b"garbage")
    splits = _splits(root, validate="off", strict=True)
    with pytest.raises(images.ImageDecodeError, match="1.jpg"):
        list(_eval_loader(splits.query))


def test_odd_modes_decode_in_loader(tmp_path):
    root = tmp_path / "modes"
    folder = root / "train" / "only"
    folder.mkdir(parents=True)
    _save(Image.new("L", (50, 40), 80), folder / "grey.jpg", "JPEG")
    _save(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), folder / "cmyk.jpg", "JPEG")
    _save(Image.new("RGBA", (50, 40), (0, 0, 0, 0)), folder / "rgba.png", "PNG")
    _save(Image.fromarray(np.full((40, 50), 65535, np.uint16)), folder / "deep.png", "PNG")
    (root / "test" / "only").mkdir(parents=True)
    _save(Image.new("RGB", (50, 40)), root / "test" / "only" / "a.jpg", "JPEG")
    splits = _splits(root)
    batch = next(iter(_eval_loader(splits.train, global_batch_size=4)))
    assert batch["mask"].all()
    pixels = batch["image"] * 127.5 + 127.5
    by_name = {Path(p).name: i for i, p in enumerate(splits.train.paths)}
    assert np.allclose(pixels[by_name["rgba.png"]], 255.0, atol=1e-3)
    assert np.allclose(pixels[by_name["deep.png"]], 255.0, atol=1e-3)
    assert abs(pixels[by_name["grey.jpg"]].mean() - 80) < 2
    red = pixels[by_name["cmyk.jpg"]].mean(axis=(0, 1))
    assert red[0] > 200
    assert red[1] < 60


def test_multilabel_batches(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        _save(Image.new("RGB", (40, 40), (i * 50, 0, 0)), tmp_path / "img" / f"{i}.jpg", "JPEG")
    (tmp_path / "train.txt").write_text("img/0.jpg a,b\nimg/1.jpg c\nimg/2.jpg b\n")
    (tmp_path / "test.txt").write_text("img/0.jpg a\n")
    config = sources.default_data_config()
    config.source = "list"
    config.root = str(tmp_path)
    splits = sources.load_retrieval_splits(config)
    batch = next(iter(_eval_loader(splits.train, global_batch_size=4)))
    assert batch["label"].shape == (4, 3)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], [[1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]])


@pytest.mark.skipif(not CUB100.is_dir(), reason=f"cub100 not found at {CUB100} (set AQHASH_SHARED_DATA)")
def test_cub100_batches():
    config = sources.default_data_config()
    config.root = str(CUB100)
    splits = sources.load_retrieval_splits(config)
    train_batch = next(iter(_train_loader(splits.train, global_batch_size=8, image_size=224)))
    assert train_batch["image"].shape == (8, 224, 224, 3)
    assert train_batch["mask"].all()
    assert -1.0 <= train_batch["image"].min() < -0.5
    assert 0.5 < train_batch["image"].max() <= 1.0
    eval_batch = next(iter(_eval_loader(splits.query, global_batch_size=8, image_size=224, resize_size=256)))
    assert eval_batch["image"].shape == (8, 224, 224, 3)
    np.testing.assert_array_equal(eval_batch["index"], np.arange(8))
    np.testing.assert_array_equal(eval_batch["label"], splits.query.labels[:8])


@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"flowers12 not found at {FLOWERS12} (set AQHASH_SHARED_DATA)")
def test_flowers12_eval_pass():
    config = sources.default_data_config()
    config.source = "image_folder"
    config.root = str(FLOWERS12)
    splits = sources.load_retrieval_splits(config)
    batches = list(_eval_loader(splits.query, global_batch_size=64, image_size=64, resize_size=73))
    assert len(batches) == 4
    index = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(index, np.arange(240))
    assert all(b["image"].shape == (64, 64, 64, 3) for b in batches)


def test_eval_rejects_crop_larger_than_resize(tmp_path):
    splits = _splits(_tree(tmp_path))
    with pytest.raises(ValueError, match="set resize_size >= image_size"):
        _eval_loader(splits.query, image_size=64, resize_size=48)
