"""Shared helpers of the training-job tests: tiny image folders, configs and subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from aqhash_jax.default_config import load_config_file

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, *, num_classes: int = 4, train_per_class: int = 12,
                      test_per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """Write a tiny image-folder set: one noisy colour per class, `<root>/<split>/<class>/<i>.jpg`."""
    rng = np.random.default_rng(seed)
    for class_index in range(num_classes):
        base = rng.integers(0, 256, 3)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            folder = root / split / f"class{class_index}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root


def load_config(name: str = "tiny"):
    """Load `configs/<name>.py` and return its ConfigDict."""
    return load_config_file(REPO / "configs" / f"{name}.py")


def run_train(workdir: Path, overrides: dict, *, devices: int = 1, extra_env: dict | None = None,
              timeout: float = 600, extra_args: tuple = ()) -> subprocess.CompletedProcess:
    """Run `python -m aqhash_jax.train` on configs/tiny.py in a subprocess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra_env or {})
    command = [
        sys.executable, "-m", "aqhash_jax.train",
        f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
    ]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    command += list(extra_args)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_records(workdir: Path) -> list[dict]:
    """Return the "train" records of `workdir/metrics.jsonl`."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def final_maps(workdir: Path) -> dict:
    """Return {protocol/ranking: mAP} of `workdir/metrics.json`."""
    metrics = json.loads((workdir / "metrics.json").read_text())
    return {
        f"{protocol}/{ranking}": metrics[protocol][ranking]["map"]
        for protocol in ("symmetric", "asymmetric") if protocol in metrics
        for ranking in ("tie-aware", "ranked")
    }
