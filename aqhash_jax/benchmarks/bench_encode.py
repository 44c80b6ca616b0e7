"""Benchmark the encoding path: input pipeline rate, backbone rate and the hashing head's cost.

    python -m aqhash_jax.benchmarks.bench_encode --output bench_encode.md

In one run on one machine the script measures two things. First, the evaluation loader (decode,
resize, centre crop, normalise) in images/s, once per grain worker count in `--workers`. Second,
the jitted inference-mode model at `--batch-size` images of `--image-size` pixels: the backbone
alone, returning the feature maps the head reads, and backbone + hashing head for each config in
`--configs` at each code length in `--code-lengths`. The Markdown report gives images/s, ms/image,
the head's share of encoding time (1 - rate(backbone + head) / rate(backbone alone)) and the share
of an estimated peak FLOP/s, with FLOPs from XLA's cost analysis of the compiled function. It also
states whether the pipeline keeps up with each model row.

Models are built with `build_model` from the config files, so the rows follow the configs. The
weights are random draws of the shapes `model.init` creates. Their values do not change the
speed as long as they are finite, and the script checks that the codes are. Model candidates are
timed in interleaved rounds and the best round of each is kept, so that load from other
processes affects every candidate alike.

The data root defaults to $AQHASH_SHARED_DATA/cub100, or shared/data/cub100 next to the
repository. JAX uses the thread setting of the environment, so set it before the start, for example
with `taskset` or `XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2"`.
`--quick` runs a small version (batch 4, 2 timed loader batches, 1 round) for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aqhash_jax import host_memory
from aqhash_jax.benchmarks.bench_backbone import _write_atomic, estimate_peak_flops
from aqhash_jax.benchmarks.bench_input import _cpu_model, _default_root, _load_average, _time_loader
from aqhash_jax.data import pipeline, sources
from aqhash_jax.default_config import load_config_file
from aqhash_jax.models import chunking
from aqhash_jax.models.backbones import input_normalization
from aqhash_jax.models.hashing import HashModel, build_model

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = (REPOSITORY / "configs" / "cub100.py", REPOSITORY / "configs" / "default.py")

# Settings of a full run and of --quick. An option given on the command line overrides both.
FULL_SETTINGS = {"batch_size": 32, "num_batches": 20, "rounds": 5}
QUICK_SETTINGS = {"batch_size": 4, "num_batches": 2, "rounds": 1}

# The head should add under this share to the encoding time.
HEAD_SHARE_TARGET = 0.10


@dataclasses.dataclass
class ModelCandidate:
    """One jitted model function to time.

    Attributes:
      name: row label in the report.
      config_name: config file stem, or "" for the backbone alone.
      code_length: bits per code, or 0 for the backbone alone.
      backbone_key: (backbone name, dtype, conv_impl). Rows with the same key compute their head
        share against the same backbone-alone row.
      call: runs the compiled function once on the benchmark batch and blocks until it is done.
      flops_per_batch: FLOPs of one call from XLA's cost analysis, NaN when XLA gives none.
    """

    name: str
    config_name: str
    code_length: int
    backbone_key: tuple[str, str, str]
    call: Callable[[], Any]
    flops_per_batch: float


def _jax_thread_count() -> tuple[int, str]:
    """Return the thread count assumed for JAX's CPU client and where the count comes from."""
    match = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if match:
        return int(match.group(1)), "intra_op_parallelism_threads in XLA_FLAGS"
    try:
        return len(os.sched_getaffinity(0)), "CPUs in this process's affinity mask"
    except AttributeError:
        return os.cpu_count() or 1, "os.cpu_count()"




# ---------------------------------------------------------------------------------------
# Input pipeline


def measure_pipeline(root: Path, *, batch_size: int, num_batches: int, image_size: int, resize_size: int,
                     worker_counts: list[int], read_threads: int, mean: np.ndarray,
                     std: np.ndarray) -> tuple[list[dict], int]:
    """Time the evaluation loader over every image of a CUB-style directory.

    Returns (rows, number of images), one row per worker count with "worker_count",
    "images_per_second", "images_per_cpu_second" (None when /proc is unavailable) and
    "first_batch_seconds".
    """
    data_config = sources.default_data_config()
    data_config.source = "cub"
    data_config.root = str(root)
    # The training and test images together, so that the default run has enough batches.
    data_config.query_split = "train+test"
    split = sources.load_retrieval_splits(data_config).query

    # NOTE: batches that the read threads prepare while the warm-up batch is timed count as timed
    # batches, so a run with few batches overstates the rate.

    needed = (num_batches + 1) * batch_size
    if len(split) < needed:
        raise ValueError(
            f"{root} has {len(split)} readable images, but {num_batches} timed batches plus one "
            f"warm-up batch of {batch_size} need {needed}; lower --num-batches or --batch-size"
        )

    rows = []
    for worker_count in worker_counts:
        loader = pipeline.make_eval_loader(
            split, global_batch_size=batch_size, image_size=image_size, resize_size=resize_size,
            mean=tuple(mean.tolist()), std=tuple(std.tolist()), worker_count=worker_count,
            read_threads=read_threads, shard_index=0, shard_count=1,
        )
        result = _time_loader(loader, num_batches, batch_size)
        rows.append({"worker_count": worker_count, **result})
        logging.info("Evaluation loader, %d worker processes: %.1f images/s (first batch %.1f s)",
                     worker_count, result["images_per_second"], result["first_batch_seconds"])
    return rows, len(split)


# ---------------------------------------------------------------------------------------
# Models


def random_variables(shapes: Any, seed: int) -> Any:
    """Draw finite variables for a tree of `jax.ShapeDtypeStruct` (as from `jax.eval_shape(init)`).

    Normalisation layers get scale 1, bias 0, running mean 0 and running variance 1. Every other
    array is normal with standard deviation 1 / sqrt(fan-in), where the fan-in is the product of
    all axes but the last, which keeps activations near unit scale.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = max(1, math.prod(leaf.shape[:-1]))
        values = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
        return jnp.asarray(values, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _run_backbone(module: HashModel, images, train: bool):
    return module.backbone(images, train=train)


def _flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    # Some JAX versions return a list with one dict per computation.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def _compile(
    function: Callable, variables: Any, images: jax.Array, chunk_size: int | None
) -> tuple[Callable[[], Any], float]:
    """Compile `function(variables, images)` as the encoding job runs it and return a blocking
    call and the FLOPs of one call.

    The encoding job runs the batch in sequential chunks of `chunk_size` images (see
    `aqhash_jax.models.chunking`).

    The FLOPs come from the whole-batch function, because XLA's cost analysis counts the body of
    the chunk loop once.
    """
    whole = jax.jit(function).lower(variables, images).compile()
    flops = _flops(whole)
    steps = chunking.chunk_steps(images.shape[0], chunking.resolve_chunk_size(chunk_size))
    if steps == 1:
        compiled = whole
    else:
        compiled = jax.jit(
            lambda v, x: chunking.apply_in_chunks(
                functools.partial(function, v), x, chunk_size=chunk_size
            )
        ).lower(variables, images).compile()

    def call():
        return jax.block_until_ready(compiled(variables, images))

    return call, flops


def build_candidates(config_paths: list[Path], code_lengths: list[int], *, batch_size: int,
                     image_size: int, seed: int = 0) -> list[ModelCandidate]:
    """Build and compile the backbone-alone and backbone + head functions of every config.

    One backbone-alone candidate is made per distinct (backbone, dtype, conv_impl) of the configs.
    Each is followed by the backbone + head candidates that share it, one per config and code
    length, in the order given.
    """
    images = jnp.asarray(
        np.random.default_rng(seed).uniform(-1.0, 1.0, (batch_size, image_size, image_size, 3)),
        dtype=jnp.float32,
    )
    key = jax.random.key(seed)
    backbone_variables: dict[tuple[str, str, str], Any] = {}
    candidates: list[ModelCandidate] = []

    for config_path in config_paths:
        config = load_config_file(config_path)
        config_name = Path(config_path).stem
        for code_length in code_lengths:
            model_config = config.model.to_dict()
            model_config["code_length"] = code_length
            if not model_config.get("backbone"):
                raise ValueError(f"{config_path} sets no model.backbone; the benchmark needs a backbone")
            model = build_model(model_config)
            chunk_size = model_config.get("inference_chunk_size")
            backbone_key = (model.backbone_name, str(model_config.get("dtype", "float32")), model.conv_impl)

            shapes = jax.eval_shape(lambda k, m=model: m.init(k, images, train=False), key)
            variables = random_variables(shapes, seed)

            if backbone_key not in backbone_variables:
                # The backbone subtree is the same for every head on this backbone, so all rows of
                # one backbone share these weights.
                backbone_variables[backbone_key] = {
                    collection: tree["backbone"] for collection, tree in variables.items()
                }
                logging.info("Compiling the backbone alone (%s)", model.backbone_name)
                call, flops = _compile(
                    lambda v, x, m=model: m.apply(v, x, train=False, method=_run_backbone)["feature_maps"],
                    variables, images, chunk_size,
                )
                candidates.append(ModelCandidate(
                    name=f"backbone alone ({model.backbone_name})", config_name="", code_length=0,
                    backbone_key=backbone_key, call=call, flops_per_batch=flops,
                ))
            for collection, tree in variables.items():
                tree["backbone"] = backbone_variables[backbone_key][collection]

            logging.info("Compiling backbone + head (%s, %d bits)", config_name, code_length)
            call, flops = _compile(
                lambda v, x, m=model: m.apply(v, x, train=False)["codes"], variables, images, chunk_size
            )
            candidates.append(ModelCandidate(
                name=f"backbone + head ({config_name}, {code_length} bits)", config_name=config_name,
                code_length=code_length, backbone_key=backbone_key, call=call, flops_per_batch=flops,
            ))

    # Backbone-alone rows first, then the heads, each group in build order.
    candidates.sort(key=lambda candidate: candidate.code_length != 0)
    return candidates


def time_candidates(candidates: list[ModelCandidate], rounds: int) -> dict[str, dict[str, float]]:
    """Warm up every candidate, then time them in `rounds` interleaved rounds.

    Returns {name: {"seconds": best wall-clock seconds per call, "cpu_seconds": best process CPU
    seconds per call}}. Process CPU time counts every thread of this process, so it grows less
    than wall-clock time when other processes load the machine.
    """
    for candidate in candidates:
        outputs = candidate.call()
        for leaf in jax.tree_util.tree_leaves(outputs):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                raise RuntimeError(
                    f"{candidate.name} returned non-finite values with random weights, which would "
                    "distort the timing; report this as a bug in the benchmark"
                )

    best = {candidate.name: {"seconds": math.inf, "cpu_seconds": math.inf} for candidate in candidates}
    for round_index in range(rounds):
        for candidate in candidates:
            cpu_start = time.process_time()
            start = time.perf_counter()
            candidate.call()
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
            best[candidate.name]["seconds"] = min(best[candidate.name]["seconds"], seconds)
            best[candidate.name]["cpu_seconds"] = min(best[candidate.name]["cpu_seconds"], cpu_seconds)
            logging.info("Round %d, %s: %.3f s", round_index, candidate.name, seconds)
    return best


def model_rows(candidates: list[ModelCandidate], timings: dict[str, dict[str, float]], *, batch_size: int,
               peak_flops: float) -> list[dict]:
    """Turn timings into report rows with rates, head share and share of peak FLOP/s.

    "head_share" is 1 - rate(row) / rate(backbone alone) for backbone + head rows and 0 for the
    backbone-alone rows.
    """
    backbone_rate = {}
    for candidate in candidates:
        if candidate.code_length == 0:
            backbone_rate[candidate.backbone_key] = batch_size / timings[candidate.name]["seconds"]

    rows = []
    for candidate in candidates:
        timing = timings[candidate.name]
        rate = batch_size / timing["seconds"]
        head_share = 1.0 - rate / backbone_rate[candidate.backbone_key] if candidate.code_length else 0.0
        flops_per_image = candidate.flops_per_batch / batch_size
        rows.append({
            "name": candidate.name,
            "config_name": candidate.config_name,
            "code_length": candidate.code_length,
            "images_per_second": rate,
            "ms_per_image": 1000.0 * timing["seconds"] / batch_size,
            "images_per_cpu_second": batch_size / timing["cpu_seconds"] if timing["cpu_seconds"] > 0 else math.nan,
            "head_share": head_share,
            "gflop_per_image": flops_per_image / 1e9,
            "peak_share": rate * flops_per_image / peak_flops,
        })
    return rows


# ---------------------------------------------------------------------------------------
# Report


def _format_number(value: float | None, pattern: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, pattern)


def _keeps_up(pipeline_rows: list[dict], rate: float) -> str:
    return " / ".join("yes" if row["images_per_second"] >= rate else "no" for row in pipeline_rows)


def format_report(*, command: str, date: str, args: argparse.Namespace, num_images: int, pipeline_rows: list[dict],
                  rows: list[dict], peak_flops: float, peak_note: str, threads: int, threads_source: str,
                  load_before: str, load_after: str) -> str:
    """Return the Markdown report of one run."""
    workers = " / ".join(str(row["worker_count"]) for row in pipeline_rows)
    lines = [
        "## Encoding throughput: input pipeline, backbone and hashing head",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {date}. Hardware: {_cpu_model()}, {os.cpu_count()} logical CPUs; JAX {jax.__version__} on "
        f"{jax.default_backend()} with {threads} threads ({threads_source}), host allocator {args.host_allocator}; Python {platform.python_version()}, "
        f"grain {getattr(grain, '__version__', 'unknown')}. Load average (1, 5, 15 min) before: {load_before}; "
        f"after: {load_after}. When the load average exceeds the core count, other jobs shared the machine "
        "and the wall-clock rates are lower bounds.",
        "",
        "### Input pipeline (evaluation loader)",
        "",
        f"Data: {num_images} images of {args.root}. Decode, resize the shorter side to {args.resize_size}, "
        f"centre crop {args.image_size}x{args.image_size}, normalise; batch {args.batch_size}, "
        f"{args.num_batches} timed batches after one warm-up batch. Batches that the read threads "
        "prepared during the warm-up count as timed, so few timed batches overstate the rate.",
        "",
        "| worker processes | images/s (wall clock) | images per CPU-second | first batch (s) |",
        "|---:|---:|---:|---:|",
    ]
    for row in pipeline_rows:
        lines.append(
            f"| {row['worker_count']} | {row['images_per_second']:.1f} | "
            f"{_format_number(row['images_per_cpu_second'], '.1f')} | {row['first_batch_seconds']:.1f} |"
        )

    lines += [
        "",
        "### Model (inference mode, jitted)",
        "",
        f"Batch {args.batch_size}, {args.image_size} px, random weights, best of {args.rounds} interleaved "
        "rounds after one warm-up call. Each function runs as the encoding job runs it: in sequential "
        f"chunks of model.inference_chunk_size images (automatic: {chunking.resolve_chunk_size(None) or 'whole batch'} "
        f"on {jax.default_backend()}). The backbone-alone row returns the feature maps the head reads. "
        "Head share = 1 - rate(backbone + head) / rate(backbone alone). FLOPs come from XLA's cost analysis "
        f"of the compiled whole-batch function. Peak (estimate): {_format_number(peak_flops / 1e9, '.0f')} GFLOP/s from "
        f"{peak_note}. Images per CPU-second counts all threads of this process.",
        "",
        f"| model | images/s | ms/image | images per CPU-second | head share of encoding time | "
        f"GFLOP/image (XLA) | share of peak (estimate) | pipeline keeps up (workers {workers}) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        head_share = f"{row['head_share']:.1%}" if row["code_length"] else "-"
        lines.append(
            f"| {row['name']} | {row['images_per_second']:.1f} | {row['ms_per_image']:.1f} | "
            f"{_format_number(row['images_per_cpu_second'], '.1f')} | {head_share} | "
            f"{_format_number(row['gflop_per_image'], '.3f')} | {_format_number(row['peak_share'], '.1%')} | "
            f"{_keeps_up(pipeline_rows, row['images_per_second'])} |"
        )

    lines += ["", "### Summary", ""]
    head_rows = [row for row in rows if row["code_length"]]
    under = [row["name"] for row in head_rows if row["head_share"] < HEAD_SHARE_TARGET]
    over = [row["name"] for row in head_rows if row["head_share"] >= HEAD_SHARE_TARGET]
    lines.append(
        f"Head share under {HEAD_SHARE_TARGET:.0%} of encoding time: {', '.join(under) or 'none'}. "
        f"At or above {HEAD_SHARE_TARGET:.0%}: {', '.join(over) or 'none'}."
    )
    slowest = min(row["images_per_second"] for row in rows)
    fastest = max(row["images_per_second"] for row in rows)
    for row in pipeline_rows:
        rate = row["images_per_second"]
        if rate >= fastest:
            verdict = "keeps up with every model row"
        elif rate >= slowest:
            verdict = "keeps up with some model rows but not all"
        else:
            verdict = "is slower than every model row, so the loader limits encoding"
        lines.append(f"- The pipeline with {row['worker_count']} worker processes ({rate:.1f} images/s) {verdict}.")
    lines += [
        "",
        "The pipeline and the model were timed one after the other. The encoding job runs both at once "
        "on the same cores, so its rate is below the lower of the two.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aqhash_jax.benchmarks.bench_encode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=_default_root(), help="CUB-style data directory")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write the report to")
    parser.add_argument("--configs", type=Path, nargs="+", default=list(DEFAULT_CONFIGS),
                        help="config files whose model section defines the heads")
    parser.add_argument("--code-lengths", type=int, nargs="+", default=[12, 48], help="bits per code, one row each")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per batch (default {FULL_SETTINGS['batch_size']}, "
                             f"--quick: {QUICK_SETTINGS['batch_size']})")
    parser.add_argument("--num-batches", type=int, default=None,
                        help=f"timed loader batches per worker count (default {FULL_SETTINGS['num_batches']}, "
                             f"--quick: {QUICK_SETTINGS['num_batches']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved model timing rounds, the best is kept (default {FULL_SETTINGS['rounds']}, "
                             f"--quick: {QUICK_SETTINGS['rounds']})")
    parser.add_argument("--image-size", type=int, default=224, help="network input side in pixels")
    parser.add_argument("--resize-size", type=int, default=256, help="shorter side before the centre crop, in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="grain worker process counts to measure")
    parser.add_argument("--read-threads", type=int, default=0, help="decoding threads per process (0: min(4, CPUs))")
    parser.add_argument("--threads", type=int, default=None,
                        help="cores in the peak FLOP/s estimate (default: JAX's thread count from XLA_FLAGS, "
                             "else the CPUs this process may run on)")
    parser.add_argument("--quick", action="store_true", help="small run for tests: batch 4, 2 loader batches, 1 round")
    host_memory.add_policy_argument(parser)
    args = parser.parse_args(argv)
    host_memory.policy_from_arguments(args, parser)

    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    for name, value in settings.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "num_batches", "rounds", "image_size", "resize_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if any(length < 1 for length in args.code_lengths):
        parser.error(f"--code-lengths must be positive; got {args.code_lengths}")
    if any(count < 0 for count in args.workers):
        parser.error(f"--workers must be 0 or more; got {args.workers}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    if args.image_size > args.resize_size:
        parser.error(f"--image-size {args.image_size} exceeds --resize-size {args.resize_size}; "
                     "the centre crop must fit inside the resized image")
    if not args.root.is_dir():
        parser.error(f"data directory {args.root} not found; pass --root or set AQHASH_SHARED_DATA")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to --output when given."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(raw_argv)
    logging.set_verbosity(logging.INFO)
    host_memory.configure_host_allocator(args.host_allocator)

    command = shlex.join(["python", "-m", "aqhash_jax.benchmarks.bench_encode", *raw_argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads, threads_source = _jax_thread_count()
    if args.threads is not None:
        threads, threads_source = args.threads, "--threads"
    peak_flops, peak_note = estimate_peak_flops(threads)
    load_before = _load_average()

    backbone_name = load_config_file(args.configs[0]).model.backbone
    mean, std = input_normalization(backbone_name)
    pipeline_rows, num_images = measure_pipeline(
        args.root, batch_size=args.batch_size, num_batches=args.num_batches, image_size=args.image_size,
        resize_size=args.resize_size, worker_counts=args.workers, read_threads=args.read_threads,
        mean=mean, std=std,
    )

    candidates = build_candidates(args.configs, args.code_lengths, batch_size=args.batch_size,
                                  image_size=args.image_size)
    timings = time_candidates(candidates, args.rounds)
    rows = model_rows(candidates, timings, batch_size=args.batch_size, peak_flops=peak_flops)
    load_after = _load_average()

    report = format_report(
        command=command, date=date, args=args, num_images=num_images, pipeline_rows=pipeline_rows, rows=rows,
        peak_flops=peak_flops, peak_note=peak_note, threads=threads, threads_source=threads_source,
        load_before=load_before, load_after=load_after,
    )
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(str(args.output), report)
        print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
