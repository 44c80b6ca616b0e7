"""Shared defaults of the training job; every experiment config starts from `get_config()`.

The values follow the reference setup of attribute-query hashing (ADSH objective, SGD with
momentum 0.9, learning rate 3e-4, weight decay 1e-4, batch 16, backbone stem and first stage
frozen). Experiment configs override what differs. Fields are plain values with no logic in
flags, so `--config.a.b=value` overrides any of them.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from aqhash_jax.data.sources import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: fields of the data package (source, root, tfds_name, splits, validation_fraction,
    # image_size, resize_size, worker_count, strict, ...).
    config.data = ml_collections.ConfigDict(default_data_config())

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "efficientnet_lite0"
    # "<backbone>/imagenet", "random", or a path to a weights file.
    config.model.init = "efficientnet_lite0/imagenet"
    config.model.code_length = 12
    config.model.width = 384
    config.model.num_heads = 8
    config.model.ffn_dim = 2048
    config.model.encoder_layers = 1
    config.model.decoder_layers = 1
    config.model.query_self_attention = False
    config.model.aux = "pairwise"  # "none", "pairwise" or "rolled"
    config.model.aux_bits = config_dict.placeholder(int)  # pairwise bits; None = code length
    config.model.aux_total_bits = 96  # rolled branch: main plus rolled bits
    config.model.num_classes = 0  # 0 = no classification term, -1 = number of classes
    config.model.norm = "batch"
    config.model.bottleneck_width = 256
    # h_k = tanh(s * w . normalize(a_k)); the reference release uses s = 1, not learned.
    config.model.compression_scale = 1.0
    config.model.learn_compression_scale = False
    # Standardise each bit's projection over the batch before the tanh (see BitCompression).
    config.model.bit_norm = False
    config.model.feature_maps = "all"  # "all" (two-scale fusion for CNNs) or "last"
    config.model.dtype = "float32"  # compute dtype, "float32" or "bfloat16"; params stay float32
    config.model.conv_impl = "auto"
    # Inference (feature extraction, encoding) runs the batch as sequential chunks of this many
    # images per device; None = 4 on the CPU and the whole batch on accelerators, 0 = whole batch.
    config.model.inference_chunk_size = config_dict.placeholder(int)

    config.loss = ml_collections.ConfigDict()
    config.loss.objective = "adsh"  # "adsh" or "symmetric"
    config.loss.gamma = 200.0
    config.loss.similarity_weight = 1.0
    config.loss.quantization_weight = 0.1
    config.loss.symmetric_form = "pairwise_mse"
    config.loss.classification_weight = 0.0
    config.loss.adsh = ml_collections.ConfigDict()
    config.loss.adsh.num_samples = 2000
    config.loss.adsh.outer_iterations = 40
    config.loss.adsh.epochs_per_iteration = 30

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "sgd"  # "sgd" or "adamw"
    config.optim.learning_rate = 3e-4
    config.optim.backbone_lr_multiplier = 1.0
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "constant"  # "cosine", "step" or "constant"
    config.optim.warmup_steps = 0
    # Steps at which "step" multiplies the rate by decay_factor; -n means "after outer iteration n".
    config.optim.step_boundaries = ()
    config.optim.decay_factor = 0.1
    config.optim.clip_norm = 0.0  # 0 = no clipping
    config.optim.frozen_backbone_stages = 2  # stem and first stage
    config.optim.freeze_backbone = False

    config.train = ml_collections.ConfigDict()
    config.train.mode = "end_to_end"  # "end_to_end" or "features" (frozen backbone, cached features)
    config.train.batch_size = 16  # global, over all devices and processes
    config.train.num_epochs = 0  # symmetric objective: epochs over the training split
    config.train.num_steps = 0  # > 0 caps the total number of steps
    config.train.log_every = 50
    config.train.eval_every = 0  # 0 = evaluate on the validation split only at the end
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.select = "last"  # "last" or "validation"
    # Comma-separated code lengths (or a tuple) for a sweep with one sub-run per length under
    # workdir/bits_<K>; empty = one run at model.code_length.
    config.train.code_lengths = ""
    config.train.feature_cache_dir = ""  # "" = <workdir>/feature_cache; must be a local path
    config.train.feature_batch_size = 32  # images per backbone call while filling the cache
    # Testing aid: > 0 stops the job after this many steps, as if it had been killed.
    config.train.stop_after_steps = 0

    config.eval = ml_collections.ConfigDict()
    config.eval.topk = 100
    config.eval.radius = 2
    config.eval.batch_size = 64
    config.eval.ranking = "tie-aware"  # ranking used for validation and model selection

    config.export = ml_collections.ConfigDict()
    config.export.enabled = True
    return config


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Load a config file (a Python file with `get_config()`, such as configs/cub100.py).

    Returns the ConfigDict that its `get_config()` builds. Raises ValueError when the file is
    missing or defines no `get_config()`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found; pass the path of an existing config file")

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"aqhash_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config() function")
    return module.get_config()
