"""Tests for aqhash_jax.data.sources: layouts, layout errors, unreadable files and roles."""

import io
import logging as std_logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aqhash_jax.data import sources

SHARED_DATA = Path(os.environ.get("AQHASH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CUB100 = SHARED_DATA / "cub100"
FLOWERS12 = SHARED_DATA / "flowers12"


def _jpeg_bytes(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_cub_original(root: Path, num_classes=3, per_class=4) -> None:
    """Write a CUB-200-2011 tree in its original form: 1-based ids, spaces, NNN. prefixes."""
    (root / "images").mkdir(parents=True)
    image_lines, label_lines, split_lines, class_lines = [], [], [], []
    image_id = 1
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        class_lines.append(f"{class_id} {folder}")
        (root / "images" / folder).mkdir()
        for k in range(per_class):
            relative = f"{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            (root / "images" / relative).write_bytes(_jpeg_bytes(image_id))
            image_lines.append(f"{image_id} {relative}")
            label_lines.append(f"{image_id} {class_id}")
            split_lines.append(f"{image_id} {1 if k % 2 == 0 else 0}")
            image_id += 1
    for name, lines in [
        ("images.txt", image_lines),
        ("image_class_labels.txt", label_lines),
        ("train_test_split.txt", split_lines),
        ("classes.txt", class_lines),
    ]:
        (root / name).write_text("\n".join(lines) + "\n")


def _write_cub_comma(root: Path, class_ids=(0, 5, 9), per_class=3) -> None:
    """Write the comma form: 0-based ids, ', ' separators, folders without a number prefix."""
    (root / "images").mkdir(parents=True)
    image_lines, label_lines, split_lines, class_lines = [], [], [], []
    image_id = 0
    for class_id in class_ids:
        name = f"Species_{class_id}"
        class_lines.append(f"{class_id}, {name}")
        (root / "images" / name).mkdir()
        for k in range(per_class):
            relative = f"{name}/{k:04d}.jpg"
            (root / "images" / relative).write_bytes(_jpeg_bytes(100 + image_id))
            image_lines.append(f"{image_id}, {relative}")
            label_lines.append(f"{image_id}, {class_id}")
            split_lines.append(f"{image_id}, {1 if k == 0 else 0}")
            image_id += 1
    for name, lines in [
        ("images.txt", image_lines),
        ("image_class_labels.txt", label_lines),
        ("train_test_split.txt", split_lines),
        ("classes.txt", class_lines),
    ]:
        (root / name).write_text("\n".join(lines) + "\n")


def _write_image_folder(root: Path, classes=("aster", "bell", "crocus"), counts=None) -> None:
    counts = counts or {"train": 6, "test": 2}
    seed = 0
    for split, count in counts.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                (folder / f"{k}.jpg").write_bytes(_jpeg_bytes(seed))
                seed += 1


def _config(**overrides):
    config = sources.default_data_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# ---------------------------------------------------------------------------------------
# CUB


def test_cub_original_layout(tmp_path):
    _write_cub_original(tmp_path)
    assert sources.detect_cub_format(tmp_path) == "original"
    splits = sources.load_cub(tmp_path, ["train", "test", "all"])
    assert len(splits["train"]) == 6
    assert len(splits["test"]) == 6
    assert len(splits["all"]) == 12
    assert splits["train"].class_names == ("Bird_1", "Bird_2", "Bird_3")
    np.testing.assert_array_equal(splits["train"].labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(splits["train"].ids, [1, 3, 5, 7, 9, 11])
    assert splits["train"].labels.dtype == np.int32
    assert splits["train"].paths[0].endswith("images/001.Bird_1/Bird_1_0000_1.jpg")


def test_cub_comma_layout_relabels_contiguously(tmp_path):
    _write_cub_comma(tmp_path)
    assert sources.detect_cub_format(tmp_path) == "comma"
    splits = sources.load_cub(tmp_path, ["train", "test"])
    np.testing.assert_array_equal(splits["train"].labels, [0, 1, 2])
    np.testing.assert_array_equal(splits["train"].ids, [0, 3, 6])
    assert len(splits["test"]) == 6
    assert splits["test"].class_names == ("Species_0", "Species_5", "Species_9")


def test_cub_record_contents(tmp_path):
    _write_cub_original(tmp_path)
    split = sources.load_cub(tmp_path, ["test"])["test"]
    record = split[2]
    assert record["image"] == Path(split.paths[2]).read_bytes()
    assert record["label"] == 1
    assert record["index"] == 2
    assert record["index"].dtype == np.int32


def test_cub_missing_metadata_file(tmp_path):
    _write_cub_original(tmp_path)
    (tmp_path / "train_test_split.txt").unlink()
    with pytest.raises(sources.DataLayoutError, match="missing train_test_split.txt") as error:
        sources.load_cub(tmp_path, ["train"])
    assert str(tmp_path) in str(error.value)
    assert "image_class_labels.txt" in str(error.value)


def test_cub_missing_root(tmp_path):
    with pytest.raises(sources.DataLayoutError, match="does not exist.*CUB-200-2011"):
        sources.load_cub(tmp_path / "nowhere", ["train"])


def test_cub_unrecognised_format(tmp_path):
    _write_cub_original(tmp_path)
    (tmp_path / "images.txt").write_text("first;line;with;semicolons\n")
    with pytest.raises(sources.DataLayoutError, match="expected a CUB-200-2011 directory"):
        sources.load_cub(tmp_path, ["train"])


def test_cub_label_outside_class_list(tmp_path):
    _write_cub_original(tmp_path)
    labels_path = tmp_path / "image_class_labels.txt"
    lines = labels_path.read_text().splitlines()
    lines[4] = "5 17"
    labels_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(sources.DataLayoutError, match="line 5 of .*image_class_labels.txt gives class id 17"):
        sources.load_cub(tmp_path, ["train"])


def test_cub_image_without_label(tmp_path):
    _write_cub_original(tmp_path)
    labels_path = tmp_path / "image_class_labels.txt"
    labels_path.write_text("\n".join(labels_path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(sources.DataLayoutError, match="image id 12 .* has no label"):
        sources.load_cub(tmp_path, ["train"])


def test_cub_invalid_split_flag(tmp_path):
    _write_cub_original(tmp_path)
    split_path = tmp_path / "train_test_split.txt"
    split_path.write_text(split_path.read_text().replace("3 1", "3 2"))
    with pytest.raises(sources.DataLayoutError, match="flag 2"):
        sources.load_cub(tmp_path, ["train"])


def test_cub_unknown_split_name(tmp_path):
    _write_cub_original(tmp_path)
    with pytest.raises(sources.DataLayoutError, match="'val' is not available"):
        sources.load_cub(tmp_path, ["val"])


# ---------------------------------------------------------------------------------------
# Image folders and list files


def test_image_folder_layout(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "aster" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "aster" / ".hidden.jpg").write_bytes(b"")
    splits = sources.load_image_folder(tmp_path, ["train", "test"])
    assert len(splits["train"]) == 18
    assert len(splits["test"]) == 6
    assert splits["train"].class_names == ("aster", "bell", "crocus")
    np.testing.assert_array_equal(np.bincount(splits["test"].labels), [2, 2, 2])


def test_image_folder_missing_split(tmp_path):
    _write_image_folder(tmp_path)
    with pytest.raises(sources.DataLayoutError, match="split folder .*val not found"):
        sources.load_image_folder(tmp_path, ["val"])


def test_missing_root_names_layout(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(sources.DataLayoutError, match="absent does not exist.*<root>/<split>/<class>"):
        sources.load_image_folder(missing, ["train"])
    with pytest.raises(sources.DataLayoutError, match="absent does not exist.*'<path> <label>'"):
        sources.load_list_files(missing, ["train"])


def test_image_folder_class_list_is_union(tmp_path):
    _write_image_folder(tmp_path, classes=("a", "b"), counts={"train": 1})
    _write_image_folder(tmp_path, classes=("b", "c"), counts={"test": 1})
    splits = sources.load_image_folder(tmp_path, ["train", "test"])
    assert splits["train"].class_names == ("a", "b", "c")
    np.testing.assert_array_equal(splits["test"].labels, [1, 2])


def _write_list_tree(root: Path, train_lines, test_lines, classes=None):
    (root / "img").mkdir(parents=True)
    for i in range(6):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg_bytes(i))
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "test.txt").write_text("\n".join(test_lines) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_list_files_with_names(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg cat", "img/1.jpg dog", "# comment", "", "img/2.jpg cat"], ["img/3.jpg emu"])
    splits = sources.load_list_files(tmp_path, ["train", "test"])
    assert splits["train"].class_names == ("cat", "dog", "emu")
    np.testing.assert_array_equal(splits["train"].labels, [0, 1, 0])
    np.testing.assert_array_equal(splits["test"].labels, [2])
    assert splits["train"].paths[1] == str(tmp_path / "img" / "1.jpg")


def test_list_files_with_int_labels_are_renumbered(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg 10", "img/1.jpg 30"], ["img/2.jpg 20"])
    splits = sources.load_list_files(tmp_path, ["train", "test"])
    assert splits["train"].class_names == ("10", "20", "30")
    np.testing.assert_array_equal(splits["train"].labels, [0, 2])
    np.testing.assert_array_equal(splits["test"].labels, [1])


def test_list_files_with_class_file(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg 2", "img/1.jpg owl"], ["img/2.jpg hawk"], classes=["hawk", "owl", "wren"])
    splits = sources.load_list_files(tmp_path, ["train", "test"])
    np.testing.assert_array_equal(splits["train"].labels, [2, 1])
    np.testing.assert_array_equal(splits["test"].labels, [0])


def test_list_files_label_outside_class_list(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg owl", "img/1.jpg heron"], ["img/2.jpg hawk"], classes=["hawk", "owl"])
    with pytest.raises(sources.DataLayoutError, match="line 2 of .*train.txt has label 'heron'.*classes.txt"):
        sources.load_list_files(tmp_path, ["train", "test"])
    _write_list_tree(tmp_path / "ids", ["img/0.jpg 5"], ["img/2.jpg 0"], classes=["hawk", "owl"])
    with pytest.raises(sources.DataLayoutError, match="label '5'.*id in 0..1"):
        sources.load_list_files(tmp_path / "ids", ["train", "test"])


def test_list_files_multilabel(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg red,round", "img/1.jpg green"], ["img/2.jpg round"])
    splits = sources.load_list_files(tmp_path, ["train", "test"])
    assert splits["train"].class_names == ("green", "red", "round")
    np.testing.assert_array_equal(splits["train"].labels, [[0, 1, 1], [1, 0, 0]])
    assert splits["train"].labels.dtype == np.int32
    np.testing.assert_array_equal(splits["test"].labels, [[0, 0, 1]])


def test_list_files_path_with_spaces(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg 1"], ["img/1.jpg 1"])
    (tmp_path / "img" / "my photo.jpg").write_bytes(_jpeg_bytes(9))
    (tmp_path / "train.txt").write_text("img/my photo.jpg 1\n")
    split = sources.load_list_files(tmp_path, ["train"])["train"]
    assert split.paths == [str(tmp_path / "img" / "my photo.jpg")]


def test_list_files_missing_list(tmp_path):
    _write_list_tree(tmp_path, ["img/0.jpg 1"], ["img/1.jpg 1"])
    with pytest.raises(sources.DataLayoutError, match="list file .*val.txt not found"):
        sources.load_list_files(tmp_path, ["val"])


# ---------------------------------------------------------------------------------------
# Unreadable files


def _write_bad_files(folder: Path) -> list[str]:
    good = _jpeg_bytes(0, size=(64, 48))
    bad = {
        "corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)),
        "truncated.jpg": good[: len(good) // 2],
        "readme.jpg": b"plain text, not an image\n",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return sorted(bad)


def _write_odd_but_valid_files(folder: Path) -> None:
    def save(image, name, image_format):
        image.save(folder / name, format=image_format)

    save(Image.new("L", (20, 20), 80), "grey.jpg", "JPEG")
    save(Image.new("CMYK", (20, 20), (10, 200, 30, 0)), "cmyk.jpg", "JPEG")
    save(Image.new("RGBA", (20, 20), (10, 200, 30, 100)), "rgba.png", "PNG")
    save(Image.fromarray(np.full((20, 20), 50000, np.uint16)), "deep.png", "PNG")
    save(Image.new("P", (20, 20), 4), "palette.png", "PNG")


def test_unreadable_files_skipped_with_one_warning(tmp_path, caplog):
    _write_image_folder(tmp_path, classes=("a", "b"), counts={"train": 3, "test": 1})
    bad_names = _write_bad_files(tmp_path / "train" / "a")
    _write_odd_but_valid_files(tmp_path / "train" / "b")
    config = _config(source="image_folder", root=str(tmp_path))

    with caplog.at_level(std_logging.WARNING):
        splits = sources.load_retrieval_splits(config)
    assert len(splits.train) == 6 + 5
    assert not any(name in p for p in splits.train.paths for name in bad_names)
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    assert "skipped 3 unreadable image files" in warnings[0]
    for name in bad_names:
        assert name in warnings[0]


def test_unreadable_files_raise_in_strict_mode(tmp_path):
    _write_image_folder(tmp_path, classes=("a",), counts={"train": 2, "test": 1})
    _write_bad_files(tmp_path / "train" / "a")
    config = _config(source="image_folder", root=str(tmp_path), strict=True)
    with pytest.raises(sources.UnreadableImagesError, match="3 unreadable image files: .*corrupt.jpg"):
        sources.load_retrieval_splits(config)


def test_missing_cub_image_file_is_unreadable(tmp_path):
    _write_cub_original(tmp_path)
    missing = next((tmp_path / "images").rglob("*.jpg"))
    missing.unlink()
    splits = sources.load_retrieval_splits(_config(source="cub", root=str(tmp_path)))
    assert len(splits.train) + len(splits.query) == 11
    with pytest.raises(sources.UnreadableImagesError, match=missing.name):
        sources.load_retrieval_splits(_config(source="cub", root=str(tmp_path), strict=True))


def test_validate_off_keeps_bad_files(tmp_path):
    _write_image_folder(tmp_path, classes=("a",), counts={"train": 2, "test": 1})
    _write_bad_files(tmp_path / "train" / "a")
    splits = sources.load_retrieval_splits(_config(source="image_folder", root=str(tmp_path), validate="off"))
    assert len(splits.train) == 5


# ---------------------------------------------------------------------------------------
# Retrieval roles and the validation split


def test_roles_default_database_is_train(tmp_path):
    _write_image_folder(tmp_path)
    splits = sources.load_retrieval_splits(_config(source="image_folder", root=str(tmp_path)))
    assert splits.database is splits.train
    assert splits.validation is None
    assert len(splits.query) == 6
    assert splits.class_names == ("aster", "bell", "crocus")


def test_roles_joined_database(tmp_path):
    _write_image_folder(tmp_path)
    config = _config(source="image_folder", root=str(tmp_path), database_split="train+test")
    splits = sources.load_retrieval_splits(config)
    assert len(splits.database) == 24
    assert splits.database.paths[:18] == splits.train.paths


def test_validation_carve_fraction_is_stratified_and_disjoint(tmp_path):
    _write_image_folder(tmp_path, counts={"train": 10, "test": 1})
    config = _config(source="image_folder", root=str(tmp_path), validation_fraction=0.2, seed=3)
    splits = sources.load_retrieval_splits(config)
    assert len(splits.validation) == 6
    np.testing.assert_array_equal(np.bincount(splits.validation.labels), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [8, 8, 8])
    assert not set(splits.validation.paths) & set(splits.train.paths)
    assert splits.database is splits.train
    assert splits.train[5]["index"] == 5


def test_validation_carve_per_class_seeded(tmp_path):
    _write_image_folder(tmp_path, counts={"train": 10, "test": 1})
    first = sources.load_retrieval_splits(
        _config(source="image_folder", root=str(tmp_path), validation_per_class=3, seed=1)
    )
    again = sources.load_retrieval_splits(
        _config(source="image_folder", root=str(tmp_path), validation_per_class=3, seed=1)
    )
    other = sources.load_retrieval_splits(
        _config(source="image_folder", root=str(tmp_path), validation_per_class=3, seed=2)
    )
    np.testing.assert_array_equal(np.bincount(first.validation.labels), [3, 3, 3])
    assert first.validation.paths == again.validation.paths
    assert first.validation.paths != other.validation.paths


def test_validation_kept_in_database_when_configured(tmp_path):
    _write_image_folder(tmp_path, counts={"train": 10, "test": 1})
    config = _config(
        source="image_folder", root=str(tmp_path), validation_per_class=2, validation_in_database=True
    )
    splits = sources.load_retrieval_splits(config)
    assert len(splits.database) == 30
    assert len(splits.train) == 24
    assert set(splits.validation.paths) <= set(splits.database.paths)


def test_validation_leaves_one_training_image(tmp_path):
    _write_image_folder(tmp_path, counts={"train": 2, "test": 1})
    split = sources.load_image_folder(tmp_path, ["train"])["train"]
    remaining, carved = sources.carve_validation(split, per_class=5)
    assert len(carved) == 3
    np.testing.assert_array_equal(np.bincount(split.labels[remaining]), [1, 1, 1])


def test_validation_options_are_exclusive(tmp_path):
    _write_image_folder(tmp_path)
    config = _config(source="image_folder", root=str(tmp_path), validation_fraction=0.1, validation_per_class=1)
    with pytest.raises(ValueError, match="either validation_fraction"):
        sources.load_retrieval_splits(config)


def test_config_without_root():
    with pytest.raises(ValueError, match="data_config.root is empty"):
        sources.load_retrieval_splits(_config(source="cub"))


def test_config_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="'folders'"):
        sources.load_retrieval_splits(_config(source="folders", root=str(tmp_path)))


def test_split_repr_is_stable_and_picklable(tmp_path):
    _write_image_folder(tmp_path)
    first = sources.load_image_folder(tmp_path, ["train"])["train"]
    second = sources.load_image_folder(tmp_path, ["train"])["train"]
    assert repr(first) == repr(second)
    assert "num_records=18" in repr(first)
    restored = pickle.loads(pickle.dumps(first))
    assert restored[3]["image"] == first[3]["image"]


def test_split_rejects_wrong_label_dtype():
    with pytest.raises(ValueError, match="dtype int64, expected int32"):
        sources.ImageSplit("s", ["a"], np.zeros(1, np.int64), np.zeros(1), ["a"], ["c"])


# ---------------------------------------------------------------------------------------
# TFDS


def test_tfds_catalogue_mapping():
    birds = sources.tfds_dataset_spec("caltech_birds2011")
    assert (birds.image_key, birds.label_key) == ("image", "label")
    assert sources.resolve_tfds_split(birds, "train") == "train"
    assert sources.resolve_tfds_split(birds, "test") == "test"
    flowers = sources.tfds_dataset_spec("oxford_flowers102")
    assert sources.resolve_tfds_split(flowers, "train") == "train+validation"
    food = sources.tfds_dataset_spec("food101")
    assert sources.resolve_tfds_split(food, "test") == "validation"
    assert sources.resolve_tfds_split(food, "train[:10%]") == "train[:10%]"
    products = sources.tfds_dataset_spec("stanford_online_products")
    assert products.label_key == "class_id"
    for name in ("stanford_dogs", "cars196", "oxford_iiit_pet"):
        assert sources.tfds_dataset_spec(name).image_key == "image"


def test_tfds_unknown_name_needs_keys():
    with pytest.raises(ValueError, match="tfds_image_key"):
        sources.tfds_dataset_spec("my_private_set")
    spec = sources.tfds_dataset_spec("my_private_set", "img", "cls")
    assert (spec.image_key, spec.label_key) == ("img", "cls")


def test_tfds_unprepared_dataset_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = _config(source="tfds", tfds_name="caltech_birds2011", tfds_data_dir=str(tmp_path))
    with pytest.raises(sources.TfdsNotPreparedError) as error:
        sources.load_retrieval_splits(config)
    message = str(error.value)
    assert "not prepared" in message
    assert "TensorFlow" in message
    assert f"tfds build caltech_birds2011 --data_dir={tmp_path} --file_format=array_record" in message


class FakeTfdsSource:
    """Random-access source with the interface of tfds.data_source: len and feature dicts."""

    def __init__(self, labels):
        self._labels = labels
        self._images = [_jpeg_bytes(i) for i in range(len(labels))]

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, row):
        return {
            "image": self._images[row],
            "label": np.int64(self._labels[row]),
            "image/filename": f"img_{row}.jpg".encode(),
        }


def test_tfds_adapter_with_fake_source():
    source = FakeTfdsSource([2, 0, 1, 2, 2])
    split = sources.tfds_split_from_source(
        source, name="birds/train", image_key="image", label_key="label", class_names=["a", "b", "c"], chunk_size=2
    )
    assert len(split) == 5
    np.testing.assert_array_equal(split.labels, [2, 0, 1, 2, 2])
    assert split.paths[3] == "img_3.jpg"
    record = split[1]
    assert record["image"] == source[1]["image"]
    assert record["index"] == 1
    subset = split.subset([4, 0])
    assert subset[0]["image"] == source[4]["image"]
    restored = pickle.loads(pickle.dumps(split))
    assert restored[2]["image"] == source[2]["image"]


def test_tfds_adapter_label_outside_classes():
    with pytest.raises(sources.DataLayoutError, match="row 1 .* label 7"):
        sources.tfds_split_from_source(
            FakeTfdsSource([0, 7]), name="x", image_key="image", label_key="label", class_names=["a", "b"]
        )


def test_tfds_adapter_missing_feature():
    with pytest.raises(sources.DataLayoutError, match="expected image feature 'jpeg'"):
        sources.tfds_split_from_source(
            FakeTfdsSource([0]), name="x", image_key="jpeg", label_key="label", class_names=None
        )


# ---------------------------------------------------------------------------------------
# Real data


@pytest.mark.skipif(not CUB100.is_dir(), reason=f"cub100 not found at {CUB100} (set AQHASH_SHARED_DATA)")
def test_cub100_counts():
    splits = sources.load_retrieval_splits(_config(source="cub", root=str(CUB100)))
    assert len(splits.train) == 2903
    assert len(splits.query) == 2999
    assert len(splits.train) + len(splits.query) == 5902
    assert len(splits.class_names) == 100
    np.testing.assert_array_equal(np.unique(splits.train.labels), np.arange(100))
    np.testing.assert_array_equal(np.unique(splits.query.labels), np.arange(100))
    assert splits.class_names[0] == "Black_footed_Albatross"


@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"flowers12 not found at {FLOWERS12} (set AQHASH_SHARED_DATA)")
def test_flowers12_counts():
    splits = sources.load_retrieval_splits(_config(source="image_folder", root=str(FLOWERS12)))
    assert len(splits.train) == 720
    assert len(splits.query) == 240
    assert len(splits.class_names) == 12
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [60] * 12)
    np.testing.assert_array_equal(np.bincount(splits.query.labels), [20] * 12)
