"""Tiny run for tests and smoke checks: a few steps on 32 px images, runs in seconds on a CPU.

    python -m aqhash_jax.train --config=configs/tiny.py --workdir=/tmp/tiny \\
        --config.data.root=/path/to/image_folder

The data root is an image folder (<root>/train/<class>/*.jpg, <root>/test/<class>/*.jpg); by
default the flowers12 set next to the repository (../shared/data/flowers12). The backbone is a
randomly initialised ViT-Ti/16 at 32 px (a 2x2 token grid), frozen, with features cached, and the
head is 16 wide. Expected result: not yet measured (a smoke test, not a benchmark).
"""

from __future__ import annotations

from pathlib import Path

from aqhash_jax.default_config import get_config as default_config


def get_config():
    config = default_config()
    config.data.source = "image_folder"
    config.data.root = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers12")
    config.data.image_size = 32
    config.data.resize_size = 36
    config.data.validate = "off"
    config.data.read_threads = 2

    config.model.backbone = "vit_ti16"
    config.model.init = "random"
    config.model.code_length = 8
    config.model.width = 16
    config.model.num_heads = 2
    config.model.ffn_dim = 32
    config.model.bottleneck_width = 16

    config.loss.adsh.num_samples = 32
    config.loss.adsh.outer_iterations = 2
    config.loss.adsh.epochs_per_iteration = 2

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 2
    config.optim.freeze_backbone = True

    config.train.mode = "features"
    config.train.batch_size = 8
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.train.feature_batch_size = 16

    config.eval.batch_size = 16
    config.eval.topk = 10
    return config
