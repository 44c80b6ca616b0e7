"""Tests for the host allocator policy: parsing, errors, and its effect on page faults."""

import argparse
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aqhash_jax import host_memory

REPO = Path(__file__).resolve().parents[1]

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Runs a jitted elementwise op on a 64 MB array 40 times and prints the minor page faults of each
# call. The policy is applied before JAX starts, as the command-line tools do.
_FAULT_PROBE = textwrap.dedent(
    """
    import resource, sys
    from aqhash_jax import host_memory
    print("applied", host_memory.configure_host_allocator(sys.argv[1]))
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((16, 1024, 1024), jnp.float32)
    faults = []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("faults", ",".join(map(str, faults)))
    """
)


def _probe_faults(policy: str) -> tuple[bool, list[int]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(host_memory.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-c", _FAULT_PROBE, policy],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split() for line in result.stdout.splitlines())
    return values["applied"] == "True", [int(count) for count in values["faults"].split(",")]


def test_environment_default_is_retain(monkeypatch):
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    assert host_memory.policy_from_environment() == "retain"

    monkeypatch.setenv(host_memory.ENV_VAR, "")
    assert host_memory.policy_from_environment() == "retain"


def test_environment_value_is_normalised(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, " System ")
    assert host_memory.policy_from_environment() == "system"


def test_environment_unknown_policy_names_fix(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")

    with pytest.raises(ValueError) as error:
        host_memory.policy_from_environment()

    message = str(error.value)
    assert "AQHASH_HOST_ALLOCATOR='jemalloc' is invalid" in message
    assert "'retain', 'system'" in message


def test_arguments_prefer_flag_over_environment(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "retain")
    parser = argparse.ArgumentParser()
    host_memory.add_policy_argument(parser)

    flagged = parser.parse_args(["--host-allocator", "system"])
    unflagged = parser.parse_args([])

    assert host_memory.policy_from_arguments(flagged, parser) == "system"
    assert host_memory.policy_from_arguments(unflagged, parser) == "retain"
    assert unflagged.host_allocator == "retain"


def test_arguments_invalid_environment_exits(monkeypatch, capsys):
    monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")
    parser = argparse.ArgumentParser()
    host_memory.add_policy_argument(parser)
    args = parser.parse_args([])

    with pytest.raises(SystemExit) as error:
        host_memory.policy_from_arguments(args, parser)

    assert error.value.code == 2
    assert "AQHASH_HOST_ALLOCATOR='jemalloc' is invalid" in capsys.readouterr().err


def test_configure_unknown_policy_raises():
    with pytest.raises(ValueError, match="policy 'tcmalloc' is invalid"):
        host_memory.configure_host_allocator("tcmalloc")


def test_system_policy_changes_nothing():
    assert host_memory.configure_host_allocator("system") is False


@pytest.mark.skipif(not GLIBC, reason="the retain policy sets glibc malloc options")
def test_retain_removes_repeated_page_faults():
    applied, retained_faults = _probe_faults("retain")
    not_applied, system_faults = _probe_faults("system")

    assert applied
    assert not not_applied
    # Every 64 MB output freshly mapped faults in 16,384 pages of 4 KiB.
    assert min(system_faults) > 16_000, system_faults
    # The retained heap grows by one output now and then (4 to 8 times in 40 calls when measured),
    # while small allocations split freed blocks, so only the total is compared.
    assert sum(retained_faults) < sum(system_faults) / 2, retained_faults


def test_train_cli_rejects_unknown_policy(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env[host_memory.ENV_VAR] = "bogus"

    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.train", "--config=configs/cub100.py", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode != 0
    assert "AQHASH_HOST_ALLOCATOR='bogus' is invalid" in result.stderr
    assert not (tmp_path / "run").exists()


def test_encode_cli_rejects_unknown_policy(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env[host_memory.ENV_VAR] = "bogus"

    result = subprocess.run(
        [sys.executable, "-m", "aqhash_jax.encode", f"--workdir={tmp_path}", "--images", str(tmp_path),
         "--out", str(tmp_path / "codes.npy")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 2
    assert "error: AQHASH_HOST_ALLOCATOR='bogus' is invalid" in result.stderr
    assert not (tmp_path / "codes.npy").exists()
