"""Shared defaults of the training job, as a config file.

    python -m aqhash_jax.train --config=configs/default.py --workdir=DIR --config.data.root=...

The fields and their values live in `aqhash_jax.default_config`, which every experiment config
in this folder starts from. This file lets the defaults run, or be printed, like any other config.
"""

from aqhash_jax.default_config import get_config

__all__ = ["get_config"]
