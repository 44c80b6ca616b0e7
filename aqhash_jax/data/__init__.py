"""Image sources and grain input pipelines for retrieval training and evaluation."""

from aqhash_jax.data.pipeline import (
    eval_shard,
    eval_shard_indices,
    iterate_decoded,
    loader_kwargs_from_config,
    make_eval_loader,
    make_train_loader,
    steps_per_epoch,
)
from aqhash_jax.data.sources import (
    DataLayoutError,
    ImageSplit,
    RetrievalSplits,
    TFDS_CATALOGUE,
    TfdsNotPreparedError,
    UnreadableImagesError,
    default_data_config,
    load_retrieval_splits,
)
