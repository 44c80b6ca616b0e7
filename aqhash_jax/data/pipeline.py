"""grain input pipelines: decode, augment or centre-crop, batch, normalise, shard by host.

Batches are dicts of numpy arrays:
  "image": float32 [b, H, W, 3], (pixels in [0, 255] - mean) / std, zeros on masked rows;
  "label": int32 [b] (or int32 [b, C] multi-hot);
  "index": int32 [b], the row of the record in its split (-1 on evaluation padding);
  "mask": bool [b], False on evaluation padding and on images that failed to decode.

Both loaders are `grain.IterDataset`s built with the `grain.MapDataset` API. Batches are
formed on the random-access dataset, before threads and worker processes take over, so a
batch holds consecutive positions of the (shuffled) stream and the batch sequence does not
depend on `worker_count` or the thread count. Iterators have `get_state()`/`set_state()`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging

from aqhash_jax.data import images as images_lib
from aqhash_jax.data.sources import ImageSplit

# Decode failures at run time: the first few are logged one by one, then every Nth.
_LOGGED_DECODE_FAILURES = 5
_DECODE_FAILURE_LOG_EVERY = 100
_decode_failures = 0
_decode_failures_lock = threading.Lock()


def _record_decode_failure(path: str, error: Exception) -> None:
    global _decode_failures
    with _decode_failures_lock:
        _decode_failures += 1
        count = _decode_failures
    if count <= _LOGGED_DECODE_FAILURES or count % _DECODE_FAILURE_LOG_EVERY == 0:
        logging.warning(
            "Masked out image %s that failed to decode (%d decode failures in this process so far): %s",
            path, count, error,
        )


def _check_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_array = np.asarray(mean, dtype=np.float64)
    std_array = np.asarray(std, dtype=np.float64)
    if mean_array.shape != (3,) or std_array.shape != (3,):
        raise ValueError(
            f"mean and std must have 3 values (R, G, B), got mean {mean!r} and std {std!r}"
        )
    if not (np.all(np.isfinite(mean_array)) and np.all(np.isfinite(std_array))):
        raise ValueError(f"mean {mean!r} and std {std!r} must be finite")
    if np.any(std_array < 1.0):
        raise ValueError(
            f"std {std!r} has values below 1; mean and std are on the [0, 255] pixel scale, so "
            "multiply values given for [0, 1] inputs by 255"
        )
    return mean_array.astype(np.float32), std_array.astype(np.float32)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _resolve_shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError(
            f"set both shard_index and shard_count or neither, got {shard_index!r} and {shard_count!r}"
        )
    if shard_index is None:
        options = grain.sharding.ShardByJaxProcess()
        return options.shard_index, options.shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    return int(shard_index), int(shard_count)


def _per_host_batch_size(global_batch_size: int, shard_count: int) -> int:
    _check_positive("global_batch_size", global_batch_size)
    if global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the {shard_count} hosts; "
            "use a multiple of the host count"
        )
    return global_batch_size // shard_count


def _check_crop_fits(image_size: int, resize_size: int) -> None:
    if image_size > resize_size:
        raise ValueError(
            f"image_size {image_size} is larger than resize_size {resize_size}; the centre crop "
            "must fit inside the resized image, so set resize_size >= image_size"
        )


def _read_options(read_threads: int, prefetch: int) -> grain.ReadOptions:
    threads = read_threads if read_threads > 0 else min(4, os.cpu_count() or 1)
    buffer = prefetch if prefetch > 0 else 2 * threads
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, threads))


def _finish(dataset: grain.MapDataset, *, worker_count: int, worker_buffer_size: int,
            read_threads: int, prefetch: int) -> grain.IterDataset:
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    iterable = dataset.to_iter_dataset(_read_options(read_threads, prefetch))
    if worker_count > 0:
        # grain 0.2 worker processes read absl flags, which raise before parsing; programs
        # that are not absl apps (scripts, notebooks, pytest) have not parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return iterable


# ---------------------------------------------------------------------------------------
# Per-record and per-batch transforms


def _empty_image(image_size: int) -> np.ndarray:
    return np.zeros((image_size, image_size, 3), dtype=np.uint8)


def _decode_or_mask(record: dict[str, Any], box_fn, image_size: int, strict: bool) -> tuple[np.ndarray, bool]:
    if record.get("pad", False):
        return _empty_image(image_size), False
    path = record.get("path", "<bytes>")
    try:
        data = record["image"]
        if isinstance(data, (bytes, bytearray)) and not data:
            raise images_lib.ImageDecodeError(f"cannot decode image {path}: no bytes were read")
        return images_lib.decode_crop(data, box_fn, image_size, name=path), True
    except images_lib.ImageDecodeError as error:
        if strict:
            raise
        _record_decode_failure(path, error)
        return _empty_image(image_size), False


def _output_record(record: dict[str, Any], pixels: np.ndarray, valid: bool) -> dict[str, Any]:
    return {
        "image": pixels,
        "label": np.asarray(record["label"], dtype=np.int32),
        "index": np.int32(record["index"]),
        "mask": np.bool_(valid),
    }


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
    """Decode with a random resized crop and a random horizontal flip; uint8 output."""

    image_size: int
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    strict: bool = False

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        def box_fn(width, height):
            return images_lib.random_resized_crop_box(
                width, height, rng, scale=tuple(self.crop_scale), ratio=tuple(self.crop_ratio)
            )

        pixels, valid = _decode_or_mask(element, box_fn, self.image_size, self.strict)
        # Draw the flip even for masked rows so later draws do not depend on decode success.
        if rng.random() < 0.5 and self.flip:
            pixels = pixels[:, ::-1]
        return _output_record(element, np.ascontiguousarray(pixels), valid)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
    """Resize the shorter side to `resize_size` and centre-crop `image_size`; uint8 output.

    With `flip=True` the record also gets "image_flipped", the horizontal mirror.
    """

    image_size: int
    resize_size: int
    flip: bool = False
    strict: bool = False

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        def box_fn(width, height):
            return images_lib.center_crop_box(width, height, self.image_size, self.resize_size)

        pixels, valid = _decode_or_mask(element, box_fn, self.image_size, self.strict)
        output = _output_record(element, pixels, valid)
        if self.flip:
            output["image_flipped"] = np.ascontiguousarray(pixels[:, ::-1])
        return output


@dataclasses.dataclass(frozen=True)
class NormalizeBatch(grain.transforms.Map):
    """Convert uint8 image batches to float32 (x - mean) / std; masked rows become zeros."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        mean = np.asarray(self.mean, dtype=np.float32)
        scale = 1.0 / np.asarray(self.std, dtype=np.float32)
        keep = batch["mask"][:, None, None, None]
        output = dict(batch)
        for key in ("image", "image_flipped"):
            if key in batch:
                normalized = (batch[key].astype(np.float32) - mean) * scale
                output[key] = np.where(keep, normalized, np.float32(0.0))
        return output


# ---------------------------------------------------------------------------------------
# Training


def make_train_loader(
    split: ImageSplit,
    *,
    global_batch_size: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    augment: bool = True,
    resize_size: int | None = None,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 0,
    prefetch: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Build the training loader of one host.

    The stream is the split shuffled with `seed` (reshuffled each epoch), repeated
    `num_epochs` times (None: forever), cut to whole global batches, and dealt to hosts
    record by record: host h takes stream positions h, h + H, ... and batches
    `global_batch_size // H` of them. Augmentation draws depend only on `seed` and the
    stream position, so a seed fixes every batch on every host, for any worker count.

    Args:
      split: the training split.
      global_batch_size: images per step over all hosts; divisible by the host count.
      image_size: side of the square output in pixels.
      mean, std: 3 floats each on the [0, 255] scale, from the backbone.
      seed: non-negative int seeding the shuffle and the augmentation.
      num_epochs: passes over the split, or None for an endless stream.
      shuffle: shuffle the split each epoch.
      augment: random resized crop (`crop_scale`, `crop_ratio`) and horizontal flip; when
        False, the evaluation resize (`resize_size`, default image_size / 0.875) and centre crop.
      worker_count: grain worker processes (0 decodes in the calling process).
      worker_buffer_size: batches each worker process prepares ahead.
      read_threads: threads decoding batches in each process (0: min(4, CPUs)).
      prefetch: batches the threads prepare ahead (0: twice the thread count).
      shard_index, shard_count: this host and the host count; default
        jax.process_index() and jax.process_count() through grain's ShardByJaxProcess.

    Returns:
      A `grain.IterDataset`; `iter()` gives an iterator with `get_state`/`set_state`.
    """
    image_size = _check_positive("image_size", image_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_epochs is not None:
        _check_positive("num_epochs", num_epochs)
    if len(split) == 0:
        raise ValueError(f"split {split.name!r} is empty")
    mean_array, std_array = _check_normalization(mean, std)
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    per_host_batch_size = _per_host_batch_size(global_batch_size, shard_count)

    dataset = grain.MapDataset.source(split)
    if shuffle:
        dataset = dataset.shuffle(seed=int(seed))
    dataset = dataset.repeat(num_epochs)
    if num_epochs is not None:
        total = len(dataset) // global_batch_size * global_batch_size
        if total == 0:
            raise ValueError(
                f"split {split.name!r} has {len(split)} records, fewer than one global batch of "
                f"{global_batch_size} over {num_epochs} epochs"
            )
        dataset = dataset[:total]

    if augment:
        transform = TrainPreprocess(
            image_size, tuple(crop_scale), tuple(crop_ratio), flip=True, strict=split.strict
        )
        dataset = dataset.random_map(transform, seed=int(seed))
    else:
        resize = resize_size if resize_size is not None else int(round(image_size / 0.875))
        _check_crop_fits(image_size, _check_positive("resize_size", resize))
        dataset = dataset.map(EvalPreprocess(image_size, resize, flip=False, strict=split.strict))

    # Slice after the random map so augmentation draws follow global stream positions.
    dataset = dataset[shard_index::shard_count]
    dataset = dataset.batch(per_host_batch_size, drop_remainder=True)
    dataset = dataset.map(NormalizeBatch(tuple(mean_array.tolist()), tuple(std_array.tolist())))
    return _finish(dataset, worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                   read_threads=read_threads, prefetch=prefetch)


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
    """Return the number of full global batches in one pass over `num_records` records."""
    return num_records // _check_positive("global_batch_size", global_batch_size)


# ---------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class EvalShard:
    """Rows [start, stop) of a split held by one host, padded to `padded_length` records."""

    start: int
    stop: int
    padded_length: int
    num_batches: int


def eval_shard(num_records: int, global_batch_size: int, shard_index: int, shard_count: int) -> EvalShard:
    """Return the contiguous rows one host evaluates and its padded length.

    Every host runs ceil(num_records / global_batch_size) batches of
    global_batch_size / shard_count records. Host h takes the h-th contiguous slice of
    num_batches * per-host batch rows, and the rows past the end of the split are padding.
    """
    per_host = _per_host_batch_size(global_batch_size, shard_count)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    num_batches = -(-num_records // global_batch_size)
    padded_length = num_batches * per_host
    start = min(shard_index * padded_length, num_records)
    stop = min(start + padded_length, num_records)
    return EvalShard(start, stop, padded_length, num_batches)


def eval_shard_indices(num_records: int, global_batch_size: int, shard_index: int, shard_count: int) -> np.ndarray:
    """Return the split rows (int64 [m]) that host `shard_index` reads in evaluation."""
    shard = eval_shard(num_records, global_batch_size, shard_index, shard_count)
    return np.arange(shard.start, shard.stop, dtype=np.int64)


class PaddedSlice:
    """Random-access view of rows [start, stop) of a split, padded with masked records."""

    def __init__(self, split: ImageSplit, shard: EvalShard):
        self._split = split
        self._shard = shard
        label_shape = split.labels.shape[1:]
        self._pad_label = np.zeros(label_shape, dtype=np.int32)

    def __len__(self) -> int:
        return self._shard.padded_length

    def __getitem__(self, position: int) -> dict[str, Any]:
        position = int(position)
        if not 0 <= position < self._shard.padded_length:
            raise IndexError(f"position {position} is outside the padded slice of {len(self)} records")
        row = self._shard.start + position
        if row < self._shard.stop:
            return self._split[row]
        return {"image": b"", "label": self._pad_label, "index": np.int32(-1), "path": "", "pad": True}

    def __repr__(self) -> str:
        return f"PaddedSlice({self._split!r}, {self._shard})"


def make_eval_loader(
    split: ImageSplit,
    *,
    global_batch_size: int,
    image_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = False,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 0,
    prefetch: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Build the evaluation loader of one host: one pass over its rows, in order.

    `eval_shard_indices` gives the host's rows. Every host yields the same number of
    batches of `global_batch_size / shard_count` rows, so the padding rows (mask False,
    index -1) fill the last batches. With `flip=True` batches also carry "image_flipped",
    the mirrored view.
    Other arguments are as in `make_train_loader`.
    """
    image_size = _check_positive("image_size", image_size)
    resize_size = _check_positive("resize_size", resize_size)
    _check_crop_fits(image_size, resize_size)
    if len(split) == 0:
        raise ValueError(f"split {split.name!r} is empty")
    mean_array, std_array = _check_normalization(mean, std)
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    per_host_batch_size = _per_host_batch_size(global_batch_size, shard_count)
    shard = eval_shard(len(split), global_batch_size, shard_index, shard_count)

    dataset = grain.MapDataset.source(PaddedSlice(split, shard))
    dataset = dataset.map(EvalPreprocess(image_size, resize_size, flip=flip, strict=split.strict))
    dataset = dataset.batch(per_host_batch_size, drop_remainder=True)
    dataset = dataset.map(NormalizeBatch(tuple(mean_array.tolist()), tuple(std_array.tolist())))
    return _finish(dataset, worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                   read_threads=read_threads, prefetch=prefetch)


def iterate_decoded(
    split: ImageSplit,
    *,
    batch_size: int,
    image_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = False,
    worker_count: int = 0,
    read_threads: int = 0,
    prefetch: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield evaluation-preprocessed batches of a split once, for feature extraction.

    `batch_size` is the global batch size. Each batch is as from `make_eval_loader`; with
    `flip=True` it also has "image_flipped" float32 [b, H, W, 3].
    """
    loader = make_eval_loader(
        split,
        global_batch_size=batch_size,
        image_size=image_size,
        resize_size=resize_size,
        mean=mean,
        std=std,
        flip=flip,
        worker_count=worker_count,
        read_threads=read_threads,
        prefetch=prefetch,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    yield from loader


def loader_kwargs_from_config(data_config) -> dict[str, Any]:
    """Return the loader keyword arguments that `data_config` sets (workers, threads, prefetch)."""
    return {
        "worker_count": int(data_config.worker_count),
        "worker_buffer_size": int(data_config.worker_buffer_size),
        "read_threads": int(data_config.read_threads),
        "prefetch": int(data_config.prefetch),
    }

