"""End-to-end tests of the training job on a tiny image folder (ViT-Ti at 32 px, mostly features mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from train_helpers import final_maps, load_config, make_image_folder, run_train, train_records

from aqhash_jax import train
from aqhash_jax.retrieval.export import load_codes
from aqhash_jax.training.config_checks import ConfigError
from aqhash_jax.training.export import load_trained_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def tiny_config(data_root: Path, cache_dir: Path, **train_overrides):
    config = load_config("tiny")
    config.data.root = str(data_root)
    config.train.feature_cache_dir = str(cache_dir)
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_root, cache_dir) -> Path:
    """One uninterrupted in-process run on this process's single CPU device."""
    workdir = tmp_path_factory.mktemp("baseline")
    train.run_job(tiny_config(data_root, cache_dir), os.fspath(workdir))
    return workdir


def test_run_writes_outputs(baseline):
    for name in ("config.json", "metrics.json", "metrics.jsonl", "tensorboard", "checkpoints", "export"):
        assert (baseline / name).exists(), name
    metrics = json.loads((baseline / "metrics.json").read_text())
    assert metrics["final_step"] == 16
    assert set(metrics["symmetric"]) == {"tie-aware", "ranked"}
    assert set(metrics["asymmetric"]) == {"tie-aware", "ranked"}
    assert 0.0 < metrics["symmetric"]["tie-aware"]["map"] <= 1.0
    config = json.loads((baseline / "config.json").read_text())
    assert config["model"]["code_length"] == 8


def test_eight_devices_match_one(baseline, data_root, tmp_path, cache_dir):
    workdir = tmp_path / "eight"
    result = run_train(
        workdir, {"data.root": data_root, "train.feature_cache_dir": cache_dir}, devices=8
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 devices" in result.stderr

    one, eight = train_records(baseline), train_records(workdir)
    assert [r["step"] for r in one] == [r["step"] for r in eight]
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], rtol=1e-4)
    maps_one, maps_eight = final_maps(baseline), final_maps(workdir)
    for key in maps_one:
        assert maps_eight[key] == pytest.approx(maps_one[key], abs=0.02), key


def test_resume_matches_uninterrupted(baseline, data_root, cache_dir, tmp_path):
    workdir = tmp_path / "resumed"
    config = tiny_config(data_root, cache_dir, stop_after_steps=6)
    assert train.run_job(config, os.fspath(workdir)) == {}
    assert not (workdir / "metrics.json").exists()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4]

    train.run_job(tiny_config(data_root, cache_dir), os.fspath(workdir))
    assert final_maps(workdir) == final_maps(baseline)
    resumed_last = train_records(workdir)[-1]
    baseline_last = train_records(baseline)[-1]
    assert resumed_last["step"] == baseline_last["step"]
    assert resumed_last["loss"] == pytest.approx(baseline_last["loss"], rel=1e-6)


def test_feature_cache_reused(baseline, cache_dir, data_root, tmp_path):
    folders = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1
    manifest = folders[0] / "manifest.json"
    written = manifest.stat().st_mtime_ns

    train.run_job(tiny_config(data_root, cache_dir, num_steps=2), os.fspath(tmp_path / "again"))
    assert manifest.stat().st_mtime_ns == written
    assert [p for p in cache_dir.iterdir() if not p.name.startswith(".")] == folders


def test_export_loads(baseline, data_root):
    query = load_codes(baseline / "export" / "query_codes.npy")
    database = load_codes(baseline / "export" / "database_codes.npy")
    assert query.code_length == 8
    assert query.num_rows == 16
    assert database.num_rows == 48
    assert query.split == "query"
    assert database.split == "database"
    assert len(query.paths) == 16
    assert query.fingerprint == database.fingerprint

    model, variables, config = load_trained_model(baseline)
    assert set(variables["params"]) == {"backbone", "head"}
    assert config["model"]["code_length"] == 8

    # The exported full model (frozen backbone + trained head) reproduces the exported codes.
    from aqhash_jax.data.sources import load_retrieval_splits
    from aqhash_jax.data.pipeline import make_eval_loader
    from aqhash_jax.models.backbones import input_normalization
    from aqhash_jax.retrieval.codes import sign_codes

    data_config = load_config("tiny").data
    data_config.root = str(data_root)
    splits = load_retrieval_splits(data_config)
    mean, std = input_normalization("vit_ti16")
    codes = []
    for batch in make_eval_loader(splits.query, global_batch_size=16, image_size=32, resize_size=36,
                                  mean=mean, std=std, shard_index=0, shard_count=1):
        codes.append(np.asarray(model.apply(variables, batch["image"], train=False)["codes"]))
    encoded = sign_codes(np.concatenate(codes))
    agreement = np.mean(encoded == query.signs())
    assert agreement > 0.95


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.code_length", 0, "config.model.code_length=0"),
        ("model.backbone", "resnet51", "config.model.backbone='resnet51'"),
        ("loss.objective", "triplet", "config.loss.objective='triplet'"),
        ("train.batch_size", 0, "config.train.batch_size=0"),
        ("data.root", "/nonexistent/cub100", "--config.data.root="),
        ("optim.name", "rmsprop", "config.optim.name='rmsprop'"),
    ],
)
def test_bad_config_fails_early(field, value, message, tmp_path, data_root):
    config = tiny_config(data_root, tmp_path / "cache")
    section, name = field.split(".")
    setattr(getattr(config, section), name, value)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        train.run_job(config, os.fspath(workdir))
    assert not workdir.exists()
    assert not (tmp_path / "cache").exists()
    assert str(value) in str(error.value)


def test_batch_not_divisible_by_devices(data_root, tmp_path):
    result = run_train(tmp_path / "run", {"data.root": data_root, "train.batch_size": 12}, devices=8)
    assert result.returncode != 0
    assert "config.train.batch_size=12 is not divisible by the 8 devices" in result.stderr
    assert not (tmp_path / "run").exists()


def test_code_length_sweep(data_root, cache_dir, tmp_path):
    config = tiny_config(data_root, cache_dir, code_lengths="4,8", num_steps=4)
    results = train.run_job(config, os.fspath(tmp_path))
    assert sorted(results) == [4, 8]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["runs"]) == ["4", "8"]
    for bits in (4, 8):
        metrics = json.loads((tmp_path / f"bits_{bits}" / "metrics.json").read_text())
        assert metrics["code_length"] == bits
        assert load_codes(tmp_path / f"bits_{bits}" / "export" / "query_codes.npy").code_length == bits


def test_relative_workdir(data_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(data_root, cache_dir, code_lengths="4", num_steps=4, checkpoint_every=2)

    results = train.run_job(config, "runs/relative")

    assert sorted(results) == [4]
    run_dir = tmp_path / "runs" / "relative" / "bits_4"
    assert (run_dir / "checkpoints" / "4").is_dir()
    assert (run_dir / "export" / "query_codes.npy").is_file()
    summary = json.loads((tmp_path / "runs" / "relative" / "summary.json").read_text())
    assert summary["runs"]["4"]["workdir"] == os.fspath(run_dir)


def test_end_to_end_resume_matches(data_root, tmp_path):
    """End-to-end mode: images through the backbone, grain iterator state in the checkpoint."""

    def config(**overrides):
        result = tiny_config(data_root, tmp_path / "unused_cache", mode="end_to_end", num_steps=4,
                             checkpoint_every=2, log_every=1, **overrides)
        result.optim.freeze_backbone = False
        result.optim.frozen_backbone_stages = 2
        result.export.enabled = False
        return result

    train.run_job(config(), os.fspath(tmp_path / "uninterrupted"))
    assert train.run_job(config(stop_after_steps=3), os.fspath(tmp_path / "resumed")) == {}
    train.run_job(config(), os.fspath(tmp_path / "resumed"))

    assert not (tmp_path / "unused_cache").exists()
    assert final_maps(tmp_path / "resumed") == final_maps(tmp_path / "uninterrupted")
    resumed = {r["step"]: r["loss"] for r in train_records(tmp_path / "resumed")}
    uninterrupted = {r["step"]: r["loss"] for r in train_records(tmp_path / "uninterrupted")}
    assert resumed[4] == pytest.approx(uninterrupted[4], rel=1e-6)


@pytest.mark.parametrize("form", ["pairwise_balanced", "centers"])
def test_symmetric_objective_checkpoints_and_exports(data_root, cache_dir, tmp_path, form):
    config = tiny_config(data_root, cache_dir, num_steps=4, checkpoint_every=2)
    config.loss.objective = "symmetric"
    config.loss.symmetric_form = form

    results = train.run_job(config, os.fspath(tmp_path))

    assert list(results) == [config.model.code_length]
    assert "asymmetric" not in json.loads((tmp_path / "metrics.json").read_text())
    assert load_codes(tmp_path / "export" / "query_codes.npy").code_length == config.model.code_length
