"""Validation of a training config before any work starts.

`check_config` raises `ConfigError` (a ValueError) naming the config field, the value found and
the fix, so a typo fails in a second instead of after feature extraction or an hour of training.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from aqhash_jax.models.backbones import BACKBONE_NAMES
from aqhash_jax.models.heads import AUX_BRANCHES, FEATURE_MAP_CHOICES, NORMS, auxiliary_bit_count

OBJECTIVES = ("adsh", "symmetric")
from aqhash_jax.losses import SYMMETRIC_FORMS
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
MODES = ("features", "end_to_end")
SELECTIONS = ("last", "validation")
RANKINGS = ("tie-aware", "ranked")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that the training job cannot run with."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_int(value: Any, field: str, minimum: int) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"config.{field}={value!r} is invalid: it must be an integer >= {minimum}; "
        f"set --config.{field}=<int>",
    )
    return value


def _require_choice(value: Any, field: str, choices: tuple[str, ...]) -> None:
    _require(
        value in choices,
        f"config.{field}={value!r} is invalid; use one of {', '.join(choices)} "
        f"(--config.{field}={choices[0]})",
    )


def parse_code_lengths(value: Any) -> tuple[int, ...]:
    """Parse `train.code_lengths`: "" or () for no sweep, "12,24,32" or a tuple of ints."""
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        parts = [part.strip() for part in value.strip("()[] ").split(",") if part.strip()]
        try:
            lengths = tuple(int(part) for part in parts)
        except ValueError as error:
            raise ConfigError(
                f"config.train.code_lengths={value!r} is invalid: it must be comma-separated "
                "integers such as --config.train.code_lengths=12,24,32,48"
            ) from error
    else:
        lengths = tuple(int(part) for part in value)
    for length in lengths:
        _require(
            length > 0,
            f"config.train.code_lengths={value!r} contains {length}; every code length must be > 0",
        )
    _require(
        len(set(lengths)) == len(lengths),
        f"config.train.code_lengths={value!r} repeats a code length; list each once",
    )
    return lengths


def is_local_path(path: str) -> bool:
    return "://" not in str(path)


def check_init(init: str, backbone: str) -> None:
    """Check `model.init`: "random", "<backbone>/<weights>" or an existing weights file."""
    if init == "random":
        return
    if "/" in init and not os.path.isabs(init) and not init.startswith("."):
        prefix = init.split("/", 1)[0]
        if prefix in BACKBONE_NAMES:
            _require(
                prefix == backbone,
                f"config.model.init={init!r} names weights of {prefix} but config.model.backbone="
                f"{backbone!r}; set --config.model.init={backbone}/imagenet or 'random'",
            )
            return
    _require(
        os.path.exists(init),
        f"config.model.init={init!r} is neither 'random', '<backbone>/imagenet' nor an existing "
        "weights file; set --config.model.init=random or point it at a checkpoint file",
    )


def check_config(config: Any, *, device_count: int | None = None) -> None:
    """Raise ConfigError for the first invalid value in a training config.

    `device_count` defaults to `jax.device_count()`, the devices of all processes; the global
    batch sizes must be multiples of it.
    """
    device_count = jax.device_count() if device_count is None else device_count
    model, loss, optim, train, evaluation = (
        config.model, config.loss, config.optim, config.train, config.eval
    )

    # Model.
    _require(
        model.backbone in BACKBONE_NAMES,
        f"config.model.backbone={model.backbone!r} is unknown; valid backbones are "
        f"{', '.join(BACKBONE_NAMES)}",
    )
    check_init(str(model.init), model.backbone)
    code_lengths = parse_code_lengths(train.code_lengths)
    for code_length in code_lengths or (model.code_length,):
        _require(
            isinstance(code_length, int) and code_length > 0,
            f"config.model.code_length={code_length!r} is invalid: the code length must be an "
            "integer > 0, for example --config.model.code_length=32",
        )
    _require_choice(model.dtype, "model.dtype", DTYPES)
    _require_choice(model.aux, "model.aux", AUX_BRANCHES)
    _require_choice(model.norm, "model.norm", NORMS)
    _require_choice(model.feature_maps, "model.feature_maps", FEATURE_MAP_CHOICES)
    if model.get("inference_chunk_size") is not None:
        _require_int(model.inference_chunk_size, "model.inference_chunk_size", 0)
    _require_int(model.width, "model.width", 1)
    _require_int(model.num_heads, "model.num_heads", 1)
    _require(
        model.width % model.num_heads == 0,
        f"config.model.width={model.width} is not divisible by config.model.num_heads="
        f"{model.num_heads}; choose a width that is a multiple of the head count",
    )
    _require_int(model.ffn_dim, "model.ffn_dim", 1)
    _require_int(model.encoder_layers, "model.encoder_layers", 0)
    _require_int(model.decoder_layers, "model.decoder_layers", 1)
    _require_int(model.num_classes, "model.num_classes", -1)
    for code_length in code_lengths or (model.code_length,):
        try:
            auxiliary_bit_count(model.aux, code_length, model.aux_bits, model.aux_total_bits)
        except ValueError as error:
            raise ConfigError(
                f"config.model.aux={model.aux!r} with aux_bits={model.aux_bits!r} is invalid at "
                f"code length {code_length}: {error}"
            ) from error

    # Loss.
    _require_choice(loss.objective, "loss.objective", OBJECTIVES)
    _require_choice(loss.symmetric_form, "loss.symmetric_form", SYMMETRIC_FORMS)
    _require(loss.gamma >= 0, f"config.loss.gamma={loss.gamma!r} must be >= 0")
    _require(
        loss.classification_weight >= 0,
        f"config.loss.classification_weight={loss.classification_weight!r} must be >= 0",
    )
    _require(
        loss.classification_weight == 0 or model.num_classes != 0,
        f"config.loss.classification_weight={loss.classification_weight} needs a classifier; set "
        "--config.model.num_classes=-1 (number of classes) or the weight to 0",
    )
    if loss.objective == "adsh":
        _require_int(loss.adsh.num_samples, "loss.adsh.num_samples", 1)
        _require_int(loss.adsh.outer_iterations, "loss.adsh.outer_iterations", 1)
        _require_int(loss.adsh.epochs_per_iteration, "loss.adsh.epochs_per_iteration", 1)
    else:
        _require(
            train.num_epochs > 0 or train.num_steps > 0,
            "the symmetric objective needs config.train.num_epochs > 0 or config.train.num_steps "
            f"> 0, got num_epochs={train.num_epochs} and num_steps={train.num_steps}",
        )

    # Optimiser.
    _require_choice(optim.name, "optim.name", OPTIMIZERS)
    _require_choice(optim.schedule, "optim.schedule", SCHEDULES)
    _require(
        optim.learning_rate > 0,
        f"config.optim.learning_rate={optim.learning_rate!r} must be > 0",
    )
    _require(
        optim.backbone_lr_multiplier >= 0,
        f"config.optim.backbone_lr_multiplier={optim.backbone_lr_multiplier!r} must be >= 0",
    )
    _require_int(optim.warmup_steps, "optim.warmup_steps", 0)
    _require(optim.clip_norm >= 0, f"config.optim.clip_norm={optim.clip_norm!r} must be >= 0")
    _require_int(optim.frozen_backbone_stages, "optim.frozen_backbone_stages", 0)
    _require(
        0 < optim.decay_factor <= 1 or optim.schedule != "step",
        f"config.optim.decay_factor={optim.decay_factor!r} must be in (0, 1]",
    )

    # Training loop.
    _require_choice(train.mode, "train.mode", MODES)
    _require_choice(train.select, "train.select", SELECTIONS)
    _require_int(train.batch_size, "train.batch_size", 1)
    _require(
        train.batch_size % device_count == 0,
        f"config.train.batch_size={train.batch_size} is not divisible by the {device_count} "
        f"devices of this run (all processes together); set --config.train.batch_size to a "
        f"multiple of {device_count}",
    )
    _require_int(evaluation.batch_size, "eval.batch_size", 1)
    _require(
        evaluation.batch_size % device_count == 0,
        f"config.eval.batch_size={evaluation.batch_size} is not divisible by the {device_count} "
        f"devices of this run; set --config.eval.batch_size to a multiple of {device_count}",
    )
    _require_int(train.feature_batch_size, "train.feature_batch_size", 1)
    _require(
        train.feature_batch_size % device_count == 0,
        f"config.train.feature_batch_size={train.feature_batch_size} is not divisible by the "
        f"{device_count} devices of this run; set it to a multiple of {device_count}",
    )
    _require_int(train.num_epochs, "train.num_epochs", 0)
    _require_int(train.num_steps, "train.num_steps", 0)
    _require_int(train.log_every, "train.log_every", 1)
    _require_int(train.eval_every, "train.eval_every", 0)
    _require_int(train.checkpoint_every, "train.checkpoint_every", 1)
    _require_int(train.keep_checkpoints, "train.keep_checkpoints", 1)
    _require_int(train.stop_after_steps, "train.stop_after_steps", 0)
    if train.mode == "features" and train.feature_cache_dir:
        _require(
            is_local_path(train.feature_cache_dir),
            f"config.train.feature_cache_dir={train.feature_cache_dir!r} is not a local path; the "
            "feature cache is memory-mapped, so point it at local disk",
        )
    if train.select == "validation":
        _require(
            config.data.validation_fraction > 0,
            "config.train.select='validation' needs a validation split; set "
            "--config.data.validation_fraction=0.1 (or another fraction > 0) or select='last'",
        )

    # Evaluation.
    _require_choice(evaluation.ranking, "eval.ranking", RANKINGS)
    _require_int(evaluation.topk, "eval.topk", 1)
    _require_int(evaluation.radius, "eval.radius", 0)
    for code_length in code_lengths or (model.code_length,):
        _require(
            evaluation.radius <= code_length,
            f"config.eval.radius={evaluation.radius} exceeds the code length {code_length}; set "
            f"--config.eval.radius to at most {code_length}",
        )
