"""Two local processes joined by jax.distributed train together like one process.

Both processes run on this machine with one CPU device each, coordinated on 127.0.0.1 at a free
port. The global batch equals the single-process run's, so both should end with its losses.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import REPO, final_maps, make_image_folder, run_train, train_records

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data_root = make_image_folder(tmp_path / "images")
    overrides = {"data.root": data_root, "train.num_steps": 8}
    port = free_port()

    import os

    processes = []
    for process_id in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        command = [
            sys.executable, "-m", "aqhash_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
            f"--workdir={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={process_id}",
            # Each process keeps its own feature cache copy, as on hosts without shared disk.
            f"--config.train.feature_cache_dir={tmp_path / f'cache_{process_id}'}",
        ] + [f"--config.{key}={value}" for key, value in overrides.items()]
        processes.append(subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ))
    single = run_train(tmp_path / "one", dict(overrides, **{"train.feature_cache_dir": tmp_path / "cache_one"}))
    outputs = [process.communicate(timeout=900) for process in processes]

    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert "process 0 of 2" in stderr or "process 1 of 2" in stderr
    assert single.returncode == 0, single.stderr[-3000:]

    two, one = train_records(tmp_path / "two"), train_records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    maps_two, maps_one = final_maps(tmp_path / "two"), final_maps(tmp_path / "one")
    for key in maps_one:
        assert maps_two[key] == pytest.approx(maps_one[key], abs=0.02), key
