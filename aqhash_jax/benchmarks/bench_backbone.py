"""Benchmark EfficientNet-Lite throughput on CPU: native vs fast convolutions vs PyTorch eager.

    python -m aqhash_jax.benchmarks.bench_backbone [--batch 32] [--size 224] [--threads 2]

Reports images/s for the forward pass (inference mode, batch norm running statistics) and for
forward plus backward (training mode, gradients of all parameters), the ratio to PyTorch eager,
and the share of an estimated peak FLOP/s. The forward pass is also timed over sequential chunks
of `--chunk-size` images, as the encoding job runs it on the CPU (see
`aqhash_jax.models.chunking`), for JAX and PyTorch alike. The PyTorch reference is built here from torch.nn
modules and loads the same ImageNet state dict. Only this script needs torch, and
`--skip-torch` runs it without torch, and `--skip-native` leaves out the slow native-convolution
rows. Runs of the candidates are interleaved, so that load from other processes affects every
candidate alike, and both the best and the median round are reported.

Set the JAX thread count before JAX starts, for example
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2"` or `taskset`.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aqhash_jax import host_memory
from aqhash_jax.models import chunking, efficientnet
from aqhash_jax.models.layers import conv_flops, same_padding
from aqhash_jax.pretrained import efficientnet_lite_weights_path, load_efficientnet_lite
from aqhash_jax.torch_checkpoint import load_torch_state_dict


def efficientnet_lite_flops(variant: str, size: int, include_top: bool = False) -> int:
    """Count the forward FLOPs of one image (2 per multiply-add; convolutions and classifier only).

    Batch norm, activations, residual adds and pooling are left out; together they add about 1%.
    """
    stages = efficientnet.stage_layout(variant)
    total = 0
    h = w = size

    def conv(h, w, k, s, cin_per_group, cout):
        out_h, out_w = -(-h // s), -(-w // s)
        return conv_flops((k, k, cin_per_group, cout), (1, out_h, out_w, cout)), out_h, out_w

    flops, h, w = conv(h, w, 3, 2, 3, efficientnet.STEM_FEATURES)
    total += flops
    channels = efficientnet.STEM_FEATURES
    for stage in stages:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            hidden = channels * stage.expand_ratio
            if stage.expand_ratio != 1:
                flops, _, _ = conv(h, w, 1, 1, channels, hidden)
                total += flops
            flops, h, w = conv(h, w, stage.kernel_size, stride, 1, hidden)
            total += flops
            flops, _, _ = conv(h, w, 1, 1, hidden, stage.features)
            total += flops
            channels = stage.features
    flops, _, _ = conv(h, w, 1, 1, channels, efficientnet.HEAD_FEATURES)
    total += flops
    if include_top:
        total += 2 * efficientnet.HEAD_FEATURES * 1000
    return total


def estimate_peak_flops(threads: int) -> tuple[float, str]:
    """Estimate peak float32 FLOP/s as threads x clock x SIMD lanes x 2 (FMA) x 2 FMA units.

    The clock comes from /proc/cpuinfo ("cpu MHz"), the width from the AVX-512 / AVX2 flags. Two
    FMA units per core is an assumption that holds for recent x86 server cores. The result is an
    estimate, not a measured peak.
    """
    mhz = None
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":")[1])
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    if mhz is None:
        return float("nan"), "clock unknown"
    if " avx512f" in flags:
        lanes = 16
    elif " avx2" in flags:
        lanes = 8
    else:
        lanes = 4
    peak = threads * mhz * 1e6 * lanes * 2 * 2
    return peak, f"{threads} cores x {mhz / 1000:.2f} GHz x {lanes} float32 lanes x 2 FMA units x 2"


def build_torch_reference(state_dict: Mapping[str, np.ndarray], variant: str = "lite0") -> Any:
    """Build EfficientNet-Lite in PyTorch (torch.nn modules) and load `state_dict` into it.

    Padding follows TensorFlow "SAME" (extra row/column at the bottom/right), as in the JAX model.
    Returns a torch.nn.Module whose forward maps NCHW images to (pooled [B, 1280], logits).
    """
    import torch
    from torch import nn
    from torch.nn import functional

    class SameConv(nn.Conv2d):
        def forward(self, x):
            pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            if any(pad_h) or any(pad_w):
                x = functional.pad(x, (pad_w[0], pad_w[1], pad_h[0], pad_h[1]))
            return super().forward(x)

    def batch_norm(channels):
        return nn.BatchNorm2d(channels, eps=efficientnet.BN_EPSILON, momentum=1 - efficientnet.BN_MOMENTUM)

    class Block(nn.Module):
        def __init__(self, cin, cout, kernel, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(cin, hidden, 1, bias=False)
                self._bn0 = batch_norm(hidden)
            self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden, bias=False)
            self._bn1 = batch_norm(hidden)
            self._project_conv = SameConv(hidden, cout, 1, bias=False)
            self._bn2 = batch_norm(cout)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = x
            if self.expand:
                y = functional.relu6(self._bn0(self._expand_conv(y)))
            y = functional.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.residual else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, efficientnet.STEM_FEATURES, 3, 2, bias=False)
            self._bn0 = batch_norm(efficientnet.STEM_FEATURES)
            blocks = []
            channels = efficientnet.STEM_FEATURES
            for stage in efficientnet.stage_layout(variant):
                for repeat in range(stage.repeats):
                    stride = stage.stride if repeat == 0 else 1
                    blocks.append(
                        Block(channels, stage.features, stage.kernel_size, stride, stage.expand_ratio)
                    )
                    channels = stage.features
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(channels, efficientnet.HEAD_FEATURES, 1, bias=False)
            self._bn1 = batch_norm(efficientnet.HEAD_FEATURES)
            self._fc = nn.Linear(efficientnet.HEAD_FEATURES, 1000)

        def forward(self, x):
            x = functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = functional.relu6(self._bn1(self._conv_head(x)))
            pooled = x.mean(dim=(2, 3))
            return pooled, self._fc(pooled)

    net = Net()
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    net.load_state_dict(tensors, strict=True)
    return net


def _time_best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _jax_candidates(
    variant: str, batch: int, size: int, chunk_size: int, skip_native: bool = False
) -> dict[str, dict[str, Callable]]:
    model_variables = load_efficientnet_lite(variant)
    images = jnp.asarray(
        np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    )
    candidates = {}
    for impl in ("fast",) if skip_native else ("native", "fast"):
        model = efficientnet.EfficientNetLite(variant=variant, conv_impl=impl)

        @jax.jit
        def forward(variables, images, model=model):
            return model.apply(variables, images, train=False)["pooled"]

        @jax.jit
        def forward_backward(variables, images, model=model):
            def loss(params):
                out, updates = model.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.mean(jnp.square(out["pooled"])), updates

            grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
            return grads, updates

        candidates[f"jax {impl}"] = {
            "forward": functools.partial(
                lambda f: jax.block_until_ready(f(model_variables, images)), forward
            ),
            "forward+backward": functools.partial(
                lambda f: jax.block_until_ready(f(model_variables, images)), forward_backward
            ),
        }

    # What the encoding job runs on the CPU: the fast path over sequential chunks of images.
    model = efficientnet.EfficientNetLite(variant=variant, conv_impl="fast")

    @jax.jit
    def forward_chunked(variables, images):
        return chunking.apply_in_chunks(
            lambda x: model.apply(variables, x, train=False)["pooled"], images, chunk_size=chunk_size
        )

    candidates[f"jax fast, chunks of {chunk_size}"] = {
        "forward": lambda: jax.block_until_ready(forward_chunked(model_variables, images))
    }
    return candidates


def _torch_candidates(
    variant: str, batch: int, size: int, threads: int, chunk_size: int
) -> dict[str, dict[str, Callable]]:
    import torch

    torch.set_num_threads(threads)
    state_dict = load_torch_state_dict(efficientnet_lite_weights_path(variant))
    images = torch.from_numpy(
        np.random.default_rng(0).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    )
    candidates = {}
    for layout, memory_format in (
        ("NCHW", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        net = build_torch_reference(state_dict, variant).to(memory_format=memory_format)
        x = images.contiguous(memory_format=memory_format)

        def forward(net=net, x=x):
            net.eval()
            with torch.inference_mode():
                net(x)

        def forward_backward(net=net, x=x):
            net.train()
            net.zero_grad(set_to_none=True)
            pooled, _ = net(x)
            pooled.square().mean().backward()

        candidates[f"torch eager {layout}"] = {"forward": forward, "forward+backward": forward_backward}

        def forward_chunked(net=net, x=x):
            # The same chunking as the JAX row above, so that the reference gets the cache benefit too.
            net.eval()
            with torch.inference_mode():
                for start in range(0, batch, chunk_size):
                    net(x[start : start + chunk_size])

        candidates[f"torch eager {layout}, chunks of {chunk_size}"] = {"forward": forward_chunked}
    return candidates


def _hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs visible"


def _best_torch_rates(rates: dict[tuple[str, str], float]) -> dict[str, float | None]:
    """Return the highest PyTorch images/s per mode, or None for a mode without a PyTorch row."""
    return {
        mode: max(
            (rate for (name, m), rate in rates.items() if m == mode and name.startswith("torch")),
            default=None,
        )
        for mode in ("forward", "forward+backward")
    }


def run(args: argparse.Namespace) -> str:
    """Run the benchmark and return the results as a Markdown section."""
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size={args.chunk_size} is invalid; give a positive number of images.")
    candidates = _jax_candidates(
        args.variant, args.batch, args.size, args.chunk_size, skip_native=args.skip_native
    )
    if not args.skip_torch:
        candidates.update(
            _torch_candidates(args.variant, args.batch, args.size, args.threads, args.chunk_size)
        )

    # Images/s of the best round, and of the median round, per (implementation, mode).
    results: dict[tuple[str, str], float] = {}
    medians: dict[tuple[str, str], float] = {}
    for mode in ("forward", "forward+backward"):
        timed = {name: fns[mode] for name, fns in candidates.items() if mode in fns}
        for name, fn in timed.items():
            logging.info("Compiling and warming up %s %s", name, mode)
            fn()
        seconds = {name: [] for name in timed}
        for round_index in range(args.rounds):
            for name, fn in timed.items():
                seconds[name].append(_time_best(fn, 1))
                logging.info("Round %d, %s %s: %.2f s", round_index, name, mode, seconds[name][-1])
        for name in timed:
            results[(name, mode)] = args.batch / min(seconds[name])
            medians[(name, mode)] = args.batch / float(np.median(seconds[name]))
            logging.info(
                "%s %s: %.1f images/s (best round), %.1f (median round)",
                name, mode, results[(name, mode)], medians[(name, mode)],
            )

    flops = efficientnet_lite_flops(args.variant, args.size)
    peak, peak_note = estimate_peak_flops(args.threads)
    torch_best = _best_torch_rates(results)
    torch_best_median = _best_torch_rates(medians)

    load = os.getloadavg()
    lines = [
        f"## EfficientNet-{args.variant.capitalize()} backbone throughput on CPU",
        "",
        f"Command: `python -m aqhash_jax.benchmarks.bench_backbone {' '.join(sys.argv[1:])}`",
        "",
        f"Hardware: {_hardware()}; JAX {jax.__version__} on {jax.default_backend()}; "
        f"batch {args.batch}, {args.size} px, {args.threads} threads, {args.rounds} "
        f"interleaved rounds; host allocator {args.host_allocator}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "",
        f"Model FLOPs (analytic, convolutions and classifier input only): "
        f"{flops / 1e9:.3f} GFLOP per image forward; forward+backward counted as 3x forward. "
        f"Peak (estimate): {peak / 1e9:.0f} GFLOP/s from {peak_note}.",
        "",
        "Best round: images/s of the fastest round. Median round: images/s of the median round, "
        "which moves less with other load; its ratio compares medians.",
        "",
        "| implementation | mode | images/s (best round) | vs best PyTorch eager | "
        "images/s (median round) | vs best PyTorch eager (medians) | share of peak (estimate, best round) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, mode), rate in results.items():
        median = medians[(name, mode)]
        reference = torch_best[mode]
        median_reference = torch_best_median[mode]
        ratio = f"{rate / reference:.2f}x" if reference else "n/a"
        median_ratio = f"{median / median_reference:.2f}x" if median_reference else "n/a"
        work = flops * (3 if mode == "forward+backward" else 1)
        share = rate * work / peak
        lines.append(
            f"| {name} | {mode} | {rate:.1f} | {ratio} | {median:.1f} | {median_ratio} | {share:.1%} |"
        )
    lines.append("")
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(text)
        temporary = f.name
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aqhash_jax.benchmarks.bench_backbone")
    parser.add_argument("--variant", default="lite0", help="EfficientNet-Lite variant with weights")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads; also the peak estimate's core count")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
    parser.add_argument(
        "--chunk-size", type=int, default=chunking.CPU_CHUNK_SIZE,
        help="images per step of the chunked forward rows",
    )
    parser.add_argument(
        "--skip-native", action="store_true",
        help="leave out the native-convolution rows (about 0.1x PyTorch, and the slowest to time)",
    )
    parser.add_argument("--skip-torch", action="store_true", help="run without the PyTorch reference")
    parser.add_argument("--output", default=None, help="write the Markdown table to this file")
    host_memory.add_policy_argument(parser, "malloc policy of this process, shared by JAX and PyTorch")
    args = parser.parse_args(argv)
    for name in ("batch", "size", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    host_memory.policy_from_arguments(args, parser)

    logging.set_verbosity(logging.INFO)
    host_memory.configure_host_allocator(args.host_allocator)
    text = run(args)
    print(text)
    if args.output:
        _write_atomic(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
