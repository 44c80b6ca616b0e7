"""Stanford Dogs from TFDS with a ViT-B/16 backbone, end to end in bfloat16, for TPU VMs.

    python -m aqhash_jax.train --config=configs/dogs.py --workdir=gs://BUCKET/dogs_32 \\
        --config.model.code_length=32 --distributed=auto

Database = the 12,000 training images, queries = the 8,580 test images (TFDS stanford_dogs,
prepared beforehand with `tfds build stanford_dogs`). The ViT's patch tokens take the place of
the CNN's fused feature maps. Parameters stay float32 and compute runs in bfloat16. The
ViT-B/16 ImageNet weights train at a tenth of the head's learning rate. Bit norm is on (see
BENCHMARKS.md: without it the codes of every image started nearly equal on cub100).

Expected result: not yet measured. Time: not yet measured.
"""

from __future__ import annotations

from aqhash_jax.default_config import get_config as default_config


def get_config():
    config = default_config()
    config.data.source = "tfds"
    config.data.tfds_name = "stanford_dogs"
    config.data.image_size = 224
    config.data.resize_size = 256
    config.data.worker_count = 16

    config.model.backbone = "vit_b16"
    config.model.init = "vit_b16/imagenet"
    config.model.code_length = 32
    config.model.width = 384
    config.model.num_heads = 8
    config.model.ffn_dim = 2048
    config.model.dtype = "bfloat16"
    # Without it the shared compression vector gave nearly one code to every image on cub100.
    config.model.bit_norm = True

    config.loss.objective = "adsh"
    config.loss.adsh.num_samples = 4000
    config.loss.adsh.outer_iterations = 20
    config.loss.adsh.epochs_per_iteration = 5

    config.optim.name = "adamw"
    config.optim.learning_rate = 3e-4
    config.optim.backbone_lr_multiplier = 0.1
    config.optim.weight_decay = 0.05
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 200
    config.optim.clip_norm = 1.0
    config.optim.frozen_backbone_stages = 1  # patch and position embeddings

    config.train.mode = "end_to_end"
    config.train.batch_size = 128
    config.train.log_every = 50
    config.train.checkpoint_every = 1000

    config.eval.batch_size = 256
    return config
