"""Tests of the experiment configs: each loads, passes the checks and documents its command."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest

from train_helpers import REPO, load_config

from aqhash_jax.training.config_checks import ConfigError, check_config, parse_code_lengths

CONFIG_NAMES = ["tiny", "cub100", "flowers12", "cub", "dogs"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_passes_checks(name):
    config = load_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    check_config(config, device_count=1)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_docstring_has_command(name):
    text = (REPO / "configs" / f"{name}.py").read_text()
    assert f"python -m aqhash_jax.train --config=configs/{name}.py" in text


@pytest.mark.parametrize("name, folder", [("cub100", "cub100"), ("flowers12", "flowers12"), ("tiny", "flowers12")])
def test_local_roots_resolve_next_to_repository(name, folder):
    root = Path(load_config(name).data.root)
    assert root == REPO.parent / "shared" / "data" / folder


def test_paper_setup_in_cub():
    config = load_config("cub")
    assert config.model.backbone == "resnet50"
    assert config.loss.objective == "adsh"
    assert (config.loss.adsh.outer_iterations, config.loss.adsh.epochs_per_iteration) == (40, 30)
    assert config.loss.adsh.num_samples == 2000
    assert config.optim.name == "sgd"
    assert config.optim.learning_rate == 3e-4
    assert config.train.batch_size == 16
    assert config.train.mode == "end_to_end"


def test_dogs_runs_bfloat16_end_to_end():
    config = load_config("dogs")
    assert config.model.dtype == "bfloat16"
    assert config.train.mode == "end_to_end"
    assert config.model.backbone == "vit_b16"


def test_code_length_parsing():
    assert parse_code_lengths("") == ()
    assert parse_code_lengths("12,24,32,48") == (12, 24, 32, 48)
    assert parse_code_lengths((12, 24)) == (12, 24)
    with pytest.raises(ConfigError, match="code_lengths='12,x'"):
        parse_code_lengths("12,x")
    with pytest.raises(ConfigError, match="contains 0"):
        parse_code_lengths("0,12")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("model.width", 30, "not divisible by config.model.num_heads"),
        ("train.select", "best", "config.train.select='best'"),
        ("optim.schedule", "linear", "config.optim.schedule='linear'"),
        ("model.init", "/no/such/weights.pth", "config.model.init='/no/such/weights.pth'"),
        ("model.init", "resnet50/imagenet", "names weights of resnet50"),
        ("eval.radius", 40, "config.eval.radius=40 exceeds the code length"),
        ("model.dtype", "float16", "config.model.dtype='float16'"),
        ("model.feature_maps", "first", "config.model.feature_maps='first'"),
        ("model.inference_chunk_size", -2, "config.model.inference_chunk_size=-2"),
    ],
)
def test_invalid_values_named(field, value, expected):
    config = load_config("cub100")
    section, name = field.split(".")
    setattr(getattr(config, section), name, value)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        check_config(config, device_count=1)


def test_batch_size_multiple_of_devices():
    config = load_config("cub100")
    config.train.batch_size = 36
    with pytest.raises(ConfigError, match="batch_size=36 is not divisible by the 8 devices"):
        check_config(config, device_count=8)


def test_validation_selection_needs_split():
    config = load_config("cub100")
    config.train.select = "validation"
    with pytest.raises(ConfigError, match="validation_fraction"):
        check_config(config, device_count=1)
    config.data.validation_fraction = 0.1
    check_config(config, device_count=1)
