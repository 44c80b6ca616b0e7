"""Tests for chunked inference in aqhash_jax.models.chunking."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.models import chunking
from aqhash_jax.models.efficientnet import EfficientNetLite


def test_resolve_chunk_size():
    assert chunking.resolve_chunk_size(None) == chunking.CPU_CHUNK_SIZE  # the tests run on the CPU
    assert chunking.resolve_chunk_size(0) == 0
    assert chunking.resolve_chunk_size(3) == 3
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="inference_chunk_size"):
            chunking.resolve_chunk_size(bad)


@pytest.mark.parametrize(
    "batch, chunk, shards, steps",
    [
        (32, 4, 1, 8),
        (30, 4, 1, 6),  # 5 images per step: the largest divisor of 30 with >= 4 per step
        (31, 4, 1, 1),  # prime batch: no even split
        (32, 4, 8, 1),  # 4 per shard already
        (64, 4, 8, 2),
        (32, 0, 1, 1),  # 0 = whole batch
        (10, 4, 3, 1),  # batch does not split over the shards
        (3, 4, 1, 1),  # fewer images than one chunk
    ],
)
def test_chunk_steps(batch, chunk, shards, steps):
    assert chunking.chunk_steps(batch, chunk, shards) == steps


def test_chunks_keep_row_order_and_pytrees():
    traced_batches = []

    def fn(inputs):
        traced_batches.append(inputs["a"].shape[0])
        return {"sum": [inputs["a"] + inputs["b"][:, :1]], "a": inputs["a"] * 2}

    a = jnp.arange(12.0).reshape(12, 1)
    b = jnp.arange(24.0).reshape(12, 2) * 10
    out = jax.jit(lambda a, b: chunking.apply_in_chunks(fn, {"a": a, "b": b}, chunk_size=3))(a, b)

    assert traced_batches == [3]  # 4 steps of 3 rows
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(a) * 2)
    np.testing.assert_array_equal(np.asarray(out["sum"][0]), np.asarray(a + b[:, :1]))


def test_chunks_reject_mixed_batch_sizes():
    with pytest.raises(ValueError, match="leading batch axis"):
        chunking.apply_in_chunks(lambda x: x, [jnp.zeros((4, 2)), jnp.zeros((3, 2))], chunk_size=2)


def test_chunked_backbone_matches_whole_batch():
    model = EfficientNetLite(variant="lite0")
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32))
    variables = jax.jit(lambda key: model.init(key, images[:1], train=False))(jax.random.key(0))

    @jax.jit
    def run(variables, images):
        def forward(x):
            return model.apply(variables, x, train=False)

        return {
            "whole": forward(images),
            "chunked": chunking.apply_in_chunks(forward, images, chunk_size=2),
        }

    out = run(variables, images)

    whole, chunked = out["whole"], out["chunked"]
    np.testing.assert_allclose(chunked["pooled"], whole["pooled"], rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked["feature_maps"], whole["feature_maps"]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_chunks_match_whole_batch():
    # 8 CPU devices, batch 32 sharded over them, 2 images per device per step (2 steps).
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from aqhash_jax.models import chunking
        from aqhash_jax.models.efficientnet import EfficientNetLite

        assert jax.device_count() == 8
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        model = EfficientNetLite(variant="lite0")
        images = np.random.default_rng(0).uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)
        variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(0))
        sharded = NamedSharding(mesh, PartitionSpec("data"))
        forward = lambda x: model.apply(variables, x, train=False)["pooled"]
        whole = jax.jit(forward, out_shardings=sharded)(jax.device_put(images, sharded))
        chunked = jax.jit(
            lambda x: chunking.apply_in_chunks(forward, x, chunk_size=2, num_shards=8),
            in_shardings=sharded, out_shardings=sharded,
        )(jax.device_put(images, sharded))
        assert chunking.chunk_steps(32, 2, 8) == 2
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
