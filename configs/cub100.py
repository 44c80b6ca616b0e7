"""cub100: 100 CUB-200-2011 species (../shared/data/cub100), frozen EfficientNet-Lite0, CPU-sized.

One code length:
    python -m aqhash_jax.train --config=configs/cub100.py --workdir=/tmp/cub100_run \\
        --config.model.code_length=12
All four code lengths, sharing one feature cache (summary in <workdir>/summary.json):
    python -m aqhash_jax.train --config=configs/cub100.py --workdir=/tmp/cub100_sweep \\
        --config.train.code_lengths=12,24,32,48

The data root defaults to ../shared/data/cub100 next to the repository; point elsewhere with
--config.data.root=/path/to/cub100. Database = the 2,903 training images, queries = the 2,999
test images. The backbone is EfficientNet-Lite0 with ImageNet weights, frozen. Its two feature
maps (stride 16 and 32) of every image and of its horizontal flip are extracted once and cached
on disk; each training step picks one of the two views. A narrow head (width 128, one encoder and
one decoder layer) reads the 49 tokens of the stride-32 map and is trained for 20 epochs with the
hash-centre loss, bit norm and no auxiliary bits (the measurements behind these choices are in
BENCHMARKS.md).

Measured (2-core AMD EPYC VM, JAX 0.10.2 on the CPU), symmetric tie-aware mAP@all at
12/24/32/48 bits: 0.670/0.817/0.849/0.861 (ranked 0.693/0.823/0.853/0.863).
Time of the four-code-length command from scratch: 606 s (10 minutes), of which feature extraction took
134 s (inference in chunks of 4 images; 258 s before it) and each code length about 2 minutes of
training plus evaluation. The mAP values did not change with the chunking.
NOTE: the backbone stays frozen, so the codes can only be as fine-grained as ImageNet features
allow; fine-tuning (train.mode="end_to_end") is for accelerators.
"""

from __future__ import annotations

from pathlib import Path

from aqhash_jax.default_config import get_config as default_config


def get_config():
    config = default_config()
    config.data.source = "cub"
    config.data.root = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub100")
    config.data.image_size = 224
    config.data.resize_size = 256

    config.model.backbone = "efficientnet_lite0"
    config.model.init = "efficientnet_lite0/imagenet"
    config.model.code_length = 12
    config.model.width = 128
    config.model.num_heads = 4
    config.model.ffn_dim = 256
    config.model.bottleneck_width = 64
    # With hash centres the pairwise auxiliary bits lower mAP@all at every code length on cub100
    # (BENCHMARKS.md), so they are off here; --config.model.aux=pairwise turns them on.
    config.model.aux = "none"
    # The stride-32 map alone (49 tokens) makes the head about five times cheaper than the
    # two-scale fusion (245 tokens), which is what lets 20 epochs fit the CPU budget.
    config.model.feature_maps = "last"
    config.model.bit_norm = True

    config.loss.objective = "symmetric"
    config.loss.symmetric_form = "centers"
    config.loss.quantization_weight = 0.1

    config.optim.name = "adamw"
    config.optim.learning_rate = 3e-3
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 200
    config.optim.freeze_backbone = True

    config.train.mode = "features"
    config.train.batch_size = 64
    config.train.num_epochs = 20
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.feature_batch_size = 32

    config.eval.batch_size = 128
    config.eval.topk = 100
    return config
