"""Encoding of evaluation splits and retrieval metrics of the training job.

Two protocols are reported for the final model. "symmetric": the network encodes both the query
set and the database, as a deployed system must. "asymmetric" (ADSH only): database items that
are training images take their code from the learned code matrix B (main bits only), as the
reference release does; database items outside the training split keep their network code.
Both are computed tie-aware (expected AP under random order within equal Hamming distance) and
ranked (stable sort, ties in database order).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging

from aqhash_jax.models import chunking
from aqhash_jax.retrieval import hamming
from aqhash_jax.retrieval.codes import sign_codes
from aqhash_jax.retrieval.metrics import retrieval_metrics
from aqhash_jax.training import mesh as mesh_lib
from aqhash_jax.training.state import apply_model

RANKINGS = ("tie-aware", "ranked")


def make_encode_fn(
    model: Any,
    mesh: jax.sharding.Mesh,
    *,
    from_features: bool,
    chunk_size: int | None = None,
) -> Callable:
    """Return a jitted `encode(params, batch_stats, inputs) -> codes float32 [b, K]` over the mesh.

    Image inputs go through the model in sequential chunks of `chunk_size` images per device
    (None: automatic, see `aqhash_jax.models.chunking`); cached feature maps go in whole.
    """

    def encode_rows(params, batch_stats, inputs):
        outputs, _ = apply_model(
            model, params, batch_stats, inputs, from_features=from_features, train=False
        )
        return outputs["codes"]

    def encode(params, batch_stats, inputs):
        if from_features:
            return encode_rows(params, batch_stats, inputs)
        return chunking.apply_in_chunks(
            lambda images: encode_rows(params, batch_stats, images),
            inputs,
            chunk_size=chunk_size,
            num_shards=mesh.devices.size,
        )

    replicated = mesh_lib.replicated(mesh)
    sharded = mesh_lib.batch_sharded(mesh)
    return jax.jit(encode, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)


def encode_batches(
    encode_fn: Callable,
    params: Any,
    batch_stats: Any,
    batches: Iterable[dict],
    num_rows: int,
    mesh: jax.sharding.Mesh,
) -> np.ndarray:
    """Encode a split and return its continuous codes float32 [num_rows, K] in split order.

    `batches` yields this process's rows of padded global batches: "inputs" (images or a list of
    feature maps), "index" int [b] (row in the split) and "mask" bool [b] (real rows).
    """
    codes_out = None
    seen = np.zeros(num_rows, dtype=bool)
    for local_batch in batches:
        global_batch = mesh_lib.shard_batch(
            mesh, {"inputs": local_batch["inputs"], "index": local_batch["index"], "mask": local_batch["mask"]}
        )
        codes = encode_fn(params, batch_stats, global_batch["inputs"])
        host = mesh_lib.to_host({"codes": codes, "index": global_batch["index"], "mask": global_batch["mask"]})
        mask = np.asarray(host["mask"], dtype=bool)
        index = np.asarray(host["index"])[mask]
        if codes_out is None:
            codes_out = np.zeros((num_rows, host["codes"].shape[1]), dtype=np.float32)
        codes_out[index] = np.asarray(host["codes"], dtype=np.float32)[mask]
        seen[index] = True
    if codes_out is None or not seen.all():
        raise RuntimeError(
            f"encoding covered {int(seen.sum())} of {num_rows} rows; the evaluation loader "
            "stopped early"
        )
    return codes_out


@contextlib.contextmanager
def _process_local_hamming_mesh():
    """Make the Hamming kernels use this process's devices only.

    The retrieval kernels build their mesh over `jax.devices()`, which in a multi-process run
    includes devices whose results this process cannot read. Every process holds all codes on the
    host, so each computes the metrics on its own devices.
    NOTE: this swaps `hamming.query_mesh` for the duration of the call; a `devices` argument on
    `retrieval_metrics` would remove the need.
    """
    if jax.process_count() == 1:
        yield
        return
    original = hamming.query_mesh
    hamming.query_mesh = lambda: jax.sharding.Mesh(np.asarray(jax.local_devices()), ("query",))
    try:
        yield
    finally:
        hamming.query_mesh = original


def compute_metrics(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    eval_config: Any,
    rankings: tuple[str, ...] = RANKINGS,
) -> dict:
    """Return {ranking: retrieval_metrics(...)} for sign codes of continuous or binary codes."""
    query_bits = sign_codes(query_codes)
    db_bits = sign_codes(db_codes)
    results = {}
    with _process_local_hamming_mesh():
        for ranking in rankings:
            results[ranking] = retrieval_metrics(
                query_bits,
                db_bits,
                query_labels,
                db_labels,
                topk=int(eval_config.topk),
                radius=int(eval_config.radius),
                ranking=ranking,
            )
    return results


def asymmetric_database_codes(
    db_network_codes: np.ndarray,
    db_paths: list[str],
    train_paths: list[str],
    code_matrix: np.ndarray,
    code_length: int,
) -> tuple[np.ndarray, int]:
    """Replace the codes of database items that are training images by their rows of B.

    Returns (codes float32 [n_db, K], number of rows taken from B).
    """
    row_of_path = {path: row for row, path in enumerate(train_paths)}
    codes = np.array(db_network_codes, dtype=np.float32, copy=True)
    replaced = 0
    for db_row, path in enumerate(db_paths):
        train_row = row_of_path.get(path)
        if train_row is not None:
            codes[db_row] = code_matrix[train_row, :code_length]
            replaced += 1
    if replaced < len(db_paths):
        logging.info(
            "asymmetric protocol: %d of %d database items are not training images and keep "
            "their network codes", len(db_paths) - replaced, len(db_paths),
        )
    return codes, replaced


def format_table(metrics: dict) -> str:
    """Format final metrics {protocol: {ranking: results}} as a text table."""
    header = f"{'protocol':<12} {'ranking':<10} {'mAP':>8} {'mAP@k':>8} {'P@k':>8} {'R@k':>8} {'P@r':>8}"
    lines = [header, "-" * len(header)]
    for protocol, by_ranking in metrics.items():
        for ranking, result in by_ranking.items():
            lines.append(
                f"{protocol:<12} {ranking:<10} {result['map']:8.4f} {result['map_at_k']:8.4f} "
                f"{result['precision_at_k']:8.4f} {result['recall_at_k']:8.4f} "
                f"{result['precision_within_radius']:8.4f}"
            )
    return "\n".join(lines)
