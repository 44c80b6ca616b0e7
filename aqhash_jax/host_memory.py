"""Host (C heap) allocator policy for the command-line tools.

XLA on the CPU allocates every executable's output and temporary buffers with the C library's
malloc. glibc serves blocks of 32 MB and more with a fresh mmap and unmaps them on free, and
threads other than the main one allocate from arenas that map large blocks the same way. So each
jitted call touches its buffers for the first time again, and the kernel zeroes and maps every
4 KiB page. On a 2-core AMD EPYC VM, a gradient step of EfficientNet-Lite0 at batch 32 spent a
third of its CPU time in the kernel doing this (see `benchmarks/bench_backbone.py
--host-allocator` and BENCHMARKS.md).

The "retain" policy keeps freed memory in the process for reuse. It sets three glibc malloc
options with `mallopt`:

- `M_MMAP_MAX = 0`: large blocks come from the heap instead of separate mappings;
- `M_ARENA_MAX = 1`: every thread allocates from the main arena, whose heap grows with brk. The
  other arenas are capped at 64 MB, so they map larger blocks whatever `M_MMAP_MAX` is set to;
- `M_TRIM_THRESHOLD = SIZE_MAX`: free never returns the top of the heap to the kernel.

The same settings are available to any program as the environment variables
`MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=<large>`. "system" leaves the C
library's defaults. The tools read the policy from `AQHASH_HOST_ALLOCATOR` (default "retain").

NOTE: with "retain" the process's resident memory stays at its peak until it exits, and all
threads share one malloc lock. On other C libraries (musl, macOS) the policy is a no-op.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform

from absl import logging

ENV_VAR = "AQHASH_HOST_ALLOCATOR"
POLICIES = ("retain", "system")
DEFAULT_POLICY = "retain"

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def policy_from_environment() -> str:
    """Return the policy named by AQHASH_HOST_ALLOCATOR, or the default when it is unset or empty.

    Raises:
      ValueError: the variable names no known policy.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return DEFAULT_POLICY
    if value not in POLICIES:
        raise ValueError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is invalid; set it to one of {list(POLICIES)} "
            "or leave it unset for the default."
        )
    return value


def add_policy_argument(parser: argparse.ArgumentParser, description: str = "malloc policy of this process") -> None:
    """Add `--host-allocator` to a benchmark's parser; `policy_from_arguments` fills its default."""
    parser.add_argument(
        "--host-allocator", choices=POLICIES, default=None,
        help=f"{description} (default: ${ENV_VAR} or {DEFAULT_POLICY}); see aqhash_jax.host_memory",
    )


def policy_from_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Return `--host-allocator`, else the environment's policy, and store it in `args`.

    An invalid AQHASH_HOST_ALLOCATOR ends the program through `parser.error`.
    """
    if args.host_allocator is None:
        try:
            args.host_allocator = policy_from_environment()
        except ValueError as error:
            parser.error(str(error))
    return args.host_allocator


def _backend_initialized() -> bool:
    # Private JAX API (checked on JAX 0.10.2). Without it, assume the backend is not started yet.
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def configure_host_allocator(policy: str | None = None) -> bool:
    """Apply a host allocator policy to this process.

    Call it before the first JAX computation: threads that XLA starts with its backend pick their
    malloc arena on their first allocation, and later settings do not move them.

    Args:
      policy: "retain" or "system"; None reads AQHASH_HOST_ALLOCATOR.

    Returns:
      True when the glibc options were set, False for "system" or where the C library is not glibc.

    Raises:
      ValueError: `policy` (or the environment variable) names no known policy.
      OSError: glibc rejected one of the options.
    """
    if policy is None:
        policy = policy_from_environment()
    if policy not in POLICIES:
        raise ValueError(f"host allocator policy {policy!r} is invalid; use one of {list(POLICIES)}.")
    if policy == "system":
        logging.info("Host allocator: the C library's defaults (%s=system).", ENV_VAR)
        return False

    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        logging.info("Host allocator: %s is not Linux with glibc; policy %r has no effect.",
                     platform.platform(), policy)
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    if _backend_initialized():
        logging.warning(
            "Host allocator: JAX started its backend before the %r policy was applied, so its "
            "threads keep their own malloc arenas and large buffers there are still mapped per call.",
            policy,
        )
    # -1 passes through mallopt's int parameter as SIZE_MAX: never trim the heap.
    for name, option, value in (
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, -1),
        ("M_MMAP_MAX", _M_MMAP_MAX, 0),
        ("M_ARENA_MAX", _M_ARENA_MAX, 1),
    ):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"mallopt({name}, {value}) failed; set {ENV_VAR}=system to skip it.")
    logging.info("Host allocator: freed memory stays in the process for reuse (%s=retain).", ENV_VAR)
    return True
