"""Benchmark the input pipeline: decoded and preprocessed images per second.

Measures the training loader (random resized crop, flip, normalisation) and the evaluation
loader (resize, centre crop, normalisation) on a CUB-style directory, in-process and with
grain worker processes, and writes a Markdown table.

  python -m aqhash_jax.benchmarks.bench_input --root /path/to/cub100 --output bench_input.md

By default the root is $AQHASH_SHARED_DATA/cub100, or shared/data/cub100 next to the
repository.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import grain
import numpy as np
import PIL

from aqhash_jax.data import pipeline, sources

# Mean and std on the [0, 255] scale that map pixels to [-1, 1]; the benchmark does not
# depend on which backbone's values are used.
_MEAN = (127.5, 127.5, 127.5)
_STD = (127.5, 127.5, 127.5)


def _default_root() -> Path:
    shared = os.environ.get("AQHASH_SHARED_DATA")
    if shared:
        return Path(shared) / "cub100"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cub100"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> str:
    try:
        return ", ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _descendant_pids(pid: int) -> list[int]:
    found = []
    try:
        task_ids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task_id in task_ids:
        try:
            with open(f"/proc/{pid}/task/{task_id}/children", encoding="ascii") as handle:
                children = [int(c) for c in handle.read().split()]
        except OSError:
            continue
        for child in children:
            found.append(child)
            found.extend(_descendant_pids(child))
    return found


def _process_tree_cpu_seconds() -> float | None:
    """Return user + system CPU seconds of this process and its live descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid()] + _descendant_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            if pid == os.getpid():
                return None
            continue
        # utime and stime are fields 14 and 15 of /proc/<pid>/stat, 12 and 13 after the name.
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _time_loader(loader, num_batches: int, batch_size: int) -> dict:
    """Time `num_batches` batches after one warm-up batch; return rates and first-batch time."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch_seconds = time.perf_counter() - start

    cpu_start = _process_tree_cpu_seconds()
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    cpu_end = _process_tree_cpu_seconds()
    if batch["image"].dtype != np.float32:
        raise RuntimeError(f"loader returned images of dtype {batch['image'].dtype}, expected float32")

    num_images = num_batches * batch_size
    cpu_rate = None
    if cpu_start is not None and cpu_end is not None and cpu_end > cpu_start:
        cpu_rate = num_images / (cpu_end - cpu_start)
    return {
        "images_per_second": num_images / elapsed,
        "images_per_cpu_second": cpu_rate,
        "first_batch_seconds": first_batch_seconds,
    }


def run(root: Path, *, batch_size: int, num_batches: int, image_size: int, resize_size: int,
        worker_counts: list[int], read_threads: int) -> list[dict]:
    config = sources.default_data_config()
    config.source = "cub"
    config.root = str(root)
    splits = sources.load_retrieval_splits(config)

    rows = []
    for worker_count in worker_counts:
        common = dict(mean=_MEAN, std=_STD, worker_count=worker_count, read_threads=read_threads,
                      shard_index=0, shard_count=1)
        train = pipeline.make_train_loader(
            splits.train, global_batch_size=batch_size, image_size=image_size, seed=0, **common
        )
        # Evaluation runs over the query split (2,999 images in cub100), so it has enough
        # batches for the warm-up and the timed ones.
        evaluation = pipeline.make_eval_loader(
            splits.query, global_batch_size=batch_size, image_size=image_size, resize_size=resize_size, **common
        )
        for mode, loader in (("train (crop, flip)", train), ("eval (resize, centre crop)", evaluation)):
            result = _time_loader(loader, num_batches, batch_size)
            rows.append({"mode": mode, "worker_count": worker_count, **result})
            print(f"{mode:28s} workers={worker_count}  {result['images_per_second']:7.1f} images/s  "
                  f"{_format_rate(result['images_per_cpu_second'])} images/CPU-s  "
                  f"(first batch {result['first_batch_seconds']:.1f} s)")
    return rows


def _format_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1f}"


def write_report(path: Path, rows: list[dict], args: argparse.Namespace, load_before: str, load_after: str,
                 num_images: int) -> None:
    lines = [
        "## Input pipeline throughput",
        "",
        f"Command: `python -m aqhash_jax.benchmarks.bench_input --batch-size {args.batch_size} "
        f"--num-batches {args.num_batches} --image-size {args.image_size} --resize-size {args.resize_size} "
        f"--workers {' '.join(str(w) for w in args.workers)}`",
        "",
        f"Data: cub100 ({num_images} JPEGs of 227x227), train split for training, query split for evaluation. "
        f"Output {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.num_batches} timed "
        "batches after one warm-up batch (worker start-up is in the first-batch column only).",
        "",
        f"Hardware: {os.cpu_count()} CPU cores, {_cpu_model()}; Python {platform.python_version()}, "
        f"grain {getattr(grain, '__version__', 'unknown')}, Pillow {PIL.__version__}. "
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after}. When the load average "
        "exceeds the core count, other jobs shared the machine and the wall-clock rates are lower bounds. "
        "Images per CPU-second (user + system time of this process and its worker processes, from "
        "/proc, over the timed batches) depends much less on other load.",
        "",
        "| mode | worker processes | images/s (wall clock) | images per CPU-second | first batch (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['worker_count']} | {row['images_per_second']:.1f} | "
            f"{_format_rate(row['images_per_cpu_second'])} | {row['first_batch_seconds']:.1f} |"
        )
    lines.append("")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as handle:
        handle.write("\n".join(lines))
        temporary = handle.name
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=_default_root(), help="CUB-style data directory")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write the table to")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--num-batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--image-size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--resize-size", type=int, default=256, help="evaluation shorter side before the crop")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker process counts to measure")
    parser.add_argument("--read-threads", type=int, default=0, help="decoding threads per process (0: min(4, CPUs))")
    args = parser.parse_args()

    if not args.root.is_dir():
        raise SystemExit(f"data directory {args.root} not found; pass --root or set AQHASH_SHARED_DATA")
    load_before = _load_average()
    rows = run(args.root, batch_size=args.batch_size, num_batches=args.num_batches, image_size=args.image_size,
               resize_size=args.resize_size, worker_counts=args.workers, read_threads=args.read_threads)
    load_after = _load_average()
    if args.output is not None:
        num_images = sum(1 for _ in (args.root / "images").rglob("*.jpg"))
        write_report(args.output, rows, args, load_before, load_after, num_images)
        print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
