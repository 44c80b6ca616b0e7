"""CUB-200-2011 with the reference setup of attribute-query hashing: ResNet-50, ADSH, end to end.

    python -m aqhash_jax.train --config=configs/cub.py --workdir=gs://BUCKET/cub_12 \\
        --config.model.code_length=12
From a local copy of CUB_200_2011 (images/, images.txt, train_test_split.txt, ...):
    ... --config.data.source=cub --config.data.root=/path/to/CUB_200_2011

Database = the 5,994 official training images, queries = the 5,794 test images; mAP over the
whole database. Setup of the authors' PyTorch release: ResNet-50 with ImageNet weights, stem and
first stage frozen, d = 384, 8 heads, FFN 2048, rolled auxiliary queries up to 96 bits, ADSH
with gamma 200, 40 outer iterations x 30 epochs over 2,000 sampled images, SGD momentum 0.9,
learning rate 3e-4 (x0.1 after iteration 30), weight decay 1e-4, batch 16, 224 px random resized
crop and flip, evaluation resize 256 and centre crop 224. Meant for an accelerator.
Bit norm is off, as in the release; on cub100 the release's compression gave nearly one code to
every image at the start of training, and --config.model.bit_norm=True is the measured fix
(BENCHMARKS.md).

Expected result: not yet measured. Time: not yet measured.
"""

from __future__ import annotations

from aqhash_jax.default_config import get_config as default_config


def get_config():
    config = default_config()
    config.data.source = "tfds"
    config.data.tfds_name = "caltech_birds2011"
    config.data.image_size = 224
    config.data.resize_size = 256
    config.data.worker_count = 8

    config.model.backbone = "resnet50"
    config.model.init = "resnet50/imagenet"
    config.model.code_length = 12
    config.model.width = 384
    config.model.num_heads = 8
    config.model.ffn_dim = 2048
    config.model.aux = "rolled"
    config.model.aux_total_bits = 96

    config.loss.objective = "adsh"
    config.loss.gamma = 200.0
    config.loss.adsh.num_samples = 2000
    config.loss.adsh.outer_iterations = 40
    config.loss.adsh.epochs_per_iteration = 30

    config.optim.name = "sgd"
    config.optim.learning_rate = 3e-4
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "step"
    config.optim.step_boundaries = (-30,)  # after outer iteration 30
    config.optim.decay_factor = 0.1
    config.optim.frozen_backbone_stages = 2

    config.train.mode = "end_to_end"
    config.train.batch_size = 16
    config.train.log_every = 100
    config.train.checkpoint_every = 2000

    config.eval.batch_size = 64
    return config
