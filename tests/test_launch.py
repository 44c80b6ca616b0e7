"""Tests for the launch scripts in launch/.

The TPU and Slurm scripts run in dry-run mode, and the printed commands are parsed with shlex and
checked. The remote shell text that they build is then run here with bash, against a recording
`aqhash_jax.train` module in a temporary project folder. This checks that the text starts, waits
for and stops the job as it would on a TPU worker or in a Slurm task. The plain-ssh launcher's --local mode runs real
local processes, and one test trains configs/tiny.py with two processes joined by
jax.distributed on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_SCRIPT = LAUNCH / "tpu.sh"
SLURM_SCRIPT = LAUNCH / "slurm_gpu.sbatch"
SSH_SCRIPT = LAUNCH / "ssh_launch.sh"

TPU_BASE_ARGS = ["--project", "proj-1", "--zone", "us-central2-b"]
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
}

# Stands in for aqhash_jax.train: records its arguments and a few environment variables to
# $RECORD_DIR/process_<id>.json, then exits, fails or sleeps as $FAKE_TRAIN_MODE selects.
RECORDING_TRAIN_MODULE = textwrap.dedent(
    """
    import json
    import os
    import sys
    import time

    arguments = sys.argv[1:]
    process_id = "0"
    for argument in arguments:
        if argument.startswith("--process_id="):
            process_id = argument.split("=", 1)[1]
    record = {
        "argv": arguments,
        "cwd": os.getcwd(),
        "env": {
            name: os.environ.get(name)
            for name in ("JAX_COORDINATOR_ADDRESS", "CUDA_VISIBLE_DEVICES", "EXTRA_SETTING")
        },
    }
    record_dir = os.environ["RECORD_DIR"]
    with open(os.path.join(record_dir, f"process_{process_id}.json"), "w") as f:
        json.dump(record, f)
    print(f"recording train module: process {process_id} started", flush=True)

    mode = os.environ.get("FAKE_TRAIN_MODE", "ok")
    if mode == "sleep":
        time.sleep(120)
    elif mode.startswith("fail:"):
        _, failing_id, status = mode.split(":")
        if process_id == failing_id:
            sys.exit(int(status))
        time.sleep(120)
    """
)


def run_script(script, args, env=None, cwd=None, timeout=60):
    """Run a launch script with bash and return the CompletedProcess (never raises on status)."""
    full_env = dict(os.environ)
    for name in ("DRY_RUN", "PROJECT", "ZONE", "ACCELERATOR_TYPE", "BUCKET", "WORKDIR", "TPU_NAME",
                 "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE", "HOSTS", "AQHASH_CONFIG"):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(script), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def printed_commands(stdout):
    """Parse the '+ ' lines of a script's output into argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option_value(command, name):
    """Return the value of --name=value in an argument list, or None."""
    prefix = f"--{name}="
    for argument in command:
        if argument.startswith(prefix):
            return argument[len(prefix):]
    return None


def gcloud_subcommand(command):
    """Return 'create', 'ssh', ... for a 'gcloud compute tpus tpu-vm X' command, else None."""
    if command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]:
        return command[4]
    return None


def make_recording_project(root: Path) -> Path:
    """Create a project folder whose aqhash_jax.train module is the recording module."""
    package = root / "aqhash_jax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(RECORDING_TRAIN_MODULE)
    return root


def path_without(tmp_path: Path, excluded: set[str]) -> str:
    """Build a PATH folder of links to every program on PATH except the excluded names."""
    bin_dir = tmp_path / "restricted_bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name in excluded or (bin_dir / entry.name).exists():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                (bin_dir / entry.name).symlink_to(entry.path)
    return str(bin_dir)


# ---------------------------------------------------------------------------------------------
# launch/tpu.sh


def test_tpu_help():
    result = run_script(TPU_SCRIPT, ["--help"])
    assert result.returncode == 0
    assert "Usage: launch/tpu.sh COMMAND" in result.stdout
    assert "--dry-run" in result.stdout


def test_tpu_create_command():
    result = run_script(
        TPU_SCRIPT,
        ["create", "--dry-run", *TPU_BASE_ARGS, "--name", "hash-v4", "--accelerator-type", "v4-8"],
    )
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert len(commands) == 1
    create = commands[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "hash-v4"]
    assert option_value(create, "zone") == "us-central2-b"
    assert option_value(create, "project") == "proj-1"
    assert option_value(create, "accelerator-type") == "v4-8"
    assert option_value(create, "version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create
    assert "accelerator type: v4-8" in result.stderr


@pytest.mark.parametrize(
    "accelerator_type, version",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_default_runtime_version(accelerator_type, version):
    result = run_script(
        TPU_SCRIPT, ["create", "--dry-run", *TPU_BASE_ARGS, "--accelerator-type", accelerator_type]
    )
    assert result.returncode == 0, result.stderr
    create = printed_commands(result.stdout)[0]
    assert option_value(create, "accelerator-type") == accelerator_type
    assert option_value(create, "version") == version


def test_tpu_explicit_version_and_spot():
    result = run_script(
        TPU_SCRIPT,
        ["create", "--dry-run", *TPU_BASE_ARGS, "--accelerator-type", "v7x-8",
         "--version", "custom-runtime", "--spot"],
    )
    assert result.returncode == 0, result.stderr
    create = printed_commands(result.stdout)[0]
    assert option_value(create, "version") == "custom-runtime"
    assert "--spot" in create


def test_tpu_unknown_accelerator_needs_version():
    result = run_script(
        TPU_SCRIPT, ["create", "--dry-run", *TPU_BASE_ARGS, "--accelerator-type", "v7x-8"]
    )
    assert result.returncode != 0
    assert "pass --version" in result.stderr


def test_tpu_settings_from_environment():
    env = {"PROJECT": "env-proj", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v5litepod-8",
           "TPU_NAME": "env-tpu", "DRY_RUN": "1"}
    result = run_script(TPU_SCRIPT, ["create"], env=env)
    assert result.returncode == 0, result.stderr
    create = printed_commands(result.stdout)[0]
    assert create[5] == "env-tpu"
    assert option_value(create, "project") == "env-proj"
    assert option_value(create, "zone") == "europe-west4-a"
    assert option_value(create, "accelerator-type") == "v5litepod-8"


@pytest.mark.parametrize(
    "missing, message",
    [("--project", "missing --project"), ("--zone", "missing --zone")],
)
def test_tpu_missing_setting(missing, message):
    args = ["create", "--dry-run", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8"]
    index = args.index(missing)
    del args[index:index + 2]
    result = run_script(TPU_SCRIPT, args)
    assert result.returncode != 0
    assert message in result.stderr
    assert printed_commands(result.stdout) == []


def test_tpu_unknown_command():
    result = run_script(TPU_SCRIPT, ["launch", "--dry-run", *TPU_BASE_ARGS])
    assert result.returncode != 0
    assert "unknown command 'launch'" in result.stderr


def test_tpu_checks_gcloud_unless_dry_run(tmp_path):
    restricted_path = path_without(tmp_path, {"gcloud"})
    args = ["delete", *TPU_BASE_ARGS]

    result = run_script(TPU_SCRIPT, args, env={"PATH": restricted_path})
    assert result.returncode != 0
    assert "'gcloud' not found" in result.stderr
    assert printed_commands(result.stdout) == []

    result = run_script(TPU_SCRIPT, [*args, "--dry-run"], env={"PATH": restricted_path})
    assert result.returncode == 0, result.stderr
    assert gcloud_subcommand(printed_commands(result.stdout)[0]) == "delete"


def test_tpu_run_sequence():
    result = run_script(
        TPU_SCRIPT,
        ["run", "--dry-run", *TPU_BASE_ARGS, "--name", "hash-pod", "--accelerator-type", "v4-32",
         "--bucket", "gs://my-bucket/", "--run-name", "dogs-48", "--source",
         "https://example.com/aqhash_jax.git", "--config", "configs/dogs.py",
         "--env", "TFDS_DATA_DIR=gs://my-bucket/tfds", "--config.model.code_length=48",
         "--", "--config.train.num_steps=100"],
    )
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    steps = [gcloud_subcommand(command) or " ".join(command[:3]) for command in commands]
    assert steps == [
        "create", "ssh", "ssh", "ssh", "mkdir -p results/dogs-48",
        "gcloud storage cp", "gcloud storage cp", "scp", "delete",
    ]

    # Every gcloud tpu-vm command names the same VM, zone and project.
    for command in commands:
        if gcloud_subcommand(command) in ("create", "ssh", "delete"):
            assert command[5] == "hash-pod"
        if gcloud_subcommand(command) is not None:
            assert option_value(command, "zone") == "us-central2-b"
            assert option_value(command, "project") == "proj-1"

    install, train, wait = commands[1], commands[2], commands[3]
    for command in (install, train, wait):
        assert option_value(command, "worker") == "all"
    assert "git clone --depth 1 https://example.com/aqhash_jax.git" in option_value(install, "command")
    assert ("python3 -m pip install --upgrade 'jax[tpu]' 'etils[epath-gcs]' ./aqhash_jax"
            in option_value(install, "command"))

    expected_train = (
        "env TFDS_DATA_DIR=gs://my-bucket/tfds python3 -m aqhash_jax.train --config=configs/dogs.py"
        " --workdir=gs://my-bucket/aqhash_jax/dogs-48 --distributed=auto"
        " --config.model.code_length=48 --config.train.num_steps=100"
    )
    assert expected_train in option_value(train, "command")
    assert f"training command on every worker: {expected_train}" in result.stderr

    copy_export, copy_metrics = commands[5], commands[6]
    assert copy_export == ["gcloud", "storage", "cp", "--recursive",
                           "gs://my-bucket/aqhash_jax/dogs-48/export", "results/dogs-48/"]
    assert copy_metrics == ["gcloud", "storage", "cp", "gs://my-bucket/aqhash_jax/dogs-48/metrics.json",
                            "results/dogs-48/metrics.json"]
    delete = commands[-1]
    assert "--quiet" in delete


def test_tpu_run_keep_vm_skips_delete():
    result = run_script(
        TPU_SCRIPT,
        ["run", "--dry-run", *TPU_BASE_ARGS, "--accelerator-type", "v4-8", "--source",
         "https://example.com/aqhash_jax.git", "--config", "configs/dogs.py", "--keep-vm"],
    )
    assert result.returncode == 0, result.stderr
    steps = [gcloud_subcommand(command) for command in printed_commands(result.stdout)]
    assert "delete" not in steps
    assert "keeping TPU VM aqhash-tpu" in result.stderr


def test_tpu_install_from_git_ref():
    result = run_script(
        TPU_SCRIPT,
        ["install", "--dry-run", *TPU_BASE_ARGS, "--source", "https://example.com/aqhash_jax.git",
         "--git-ref", "v0.1.0", "--jax-spec", "jax[tpu]==0.10.2", "--extra-packages", ""],
    )
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert len(commands) == 1
    remote = option_value(commands[0], "command")
    assert option_value(commands[0], "worker") == "all"
    assert "git clone --depth 1 --branch v0.1.0 https://example.com/aqhash_jax.git aqhash_jax.new" in remote
    assert "-m pip install --upgrade 'jax[tpu]==0.10.2' ./aqhash_jax" in remote


def test_tpu_install_from_wheel(tmp_path):
    wheel = tmp_path / "aqhash_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel contents")
    configs = tmp_path / "configs"
    configs.mkdir()
    result = run_script(
        TPU_SCRIPT,
        ["install", "--dry-run", *TPU_BASE_ARGS, "--source", str(wheel), "--configs-dir", str(configs)],
    )
    assert result.returncode == 0, result.stderr
    prepare, copy, pip = printed_commands(result.stdout)
    assert option_value(prepare, "command") == "rm -rf aqhash_jax && mkdir -p aqhash_jax"
    assert gcloud_subcommand(copy) == "scp"
    assert option_value(copy, "worker") == "all"
    assert "--recurse" in copy
    assert str(wheel) in copy
    assert str(configs) in copy
    assert "aqhash-tpu:aqhash_jax/" in copy
    assert option_value(pip, "worker") == "all"
    assert option_value(pip, "command") == (
        "python3 -m pip install --upgrade 'jax[tpu]' 'etils[epath-gcs]'"
        " aqhash_jax/aqhash_jax-0.1.0-py3-none-any.whl"
    )


def test_tpu_install_missing_wheel(tmp_path):
    result = run_script(
        TPU_SCRIPT,
        ["install", "--dry-run", *TPU_BASE_ARGS, "--source", str(tmp_path / "missing.whl")],
    )
    assert result.returncode != 0
    assert "not found" in result.stderr


def test_tpu_fetch_local_workdir():
    result = run_script(TPU_SCRIPT, ["fetch", "--dry-run", *TPU_BASE_ARGS, "--dest", "out"])
    assert result.returncode == 0, result.stderr
    mkdir, export, metrics, log = printed_commands(result.stdout)
    assert mkdir == ["mkdir", "-p", "out"]
    for command in (export, metrics, log):
        assert gcloud_subcommand(command) == "scp"
        assert option_value(command, "worker") == "0"
    assert "aqhash-tpu:aqhash_workdirs/aqhash-tpu/export" in export
    assert "--recurse" in export
    assert "aqhash-tpu:aqhash_workdirs/aqhash-tpu/metrics.json" in metrics
    assert "aqhash-tpu:aqhash_logs/aqhash-tpu.log" in log


def tpu_remote_command(subcommand, extra_args):
    """Return the --command text that tpu.sh SUBCOMMAND sends to the workers."""
    result = run_script(TPU_SCRIPT, [subcommand, "--dry-run", *TPU_BASE_ARGS, *extra_args])
    assert result.returncode == 0, result.stderr
    (command,) = printed_commands(result.stdout)
    return option_value(command, "command")


def run_on_worker(command_text, home: Path, env, timeout=60):
    """Run a worker command as gcloud ssh would: with bash, in the home folder."""
    return subprocess.run(
        ["bash", "-c", command_text],
        cwd=home,
        env={**os.environ, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tpu_worker_commands_start_wait(tmp_path):
    home = tmp_path / "home"
    make_recording_project(home / "aqhash_jax")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    env = {"RECORD_DIR": str(record_dir), "FAKE_TRAIN_MODE": "ok"}
    args = ["--run-name", "run1", "--python", sys.executable, "--config", "configs/tiny.py",
            "--env", "EXTRA_SETTING=on", "--poll-seconds", "1", "--config.seed=3"]

    started = run_on_worker(tpu_remote_command("train", args), home, env)
    assert started.returncode == 0, started.stderr
    assert "started run run1" in started.stdout
    assert (home / "aqhash_logs" / "run1.pid").is_file()

    waited = run_on_worker(tpu_remote_command("wait", args), home, env)
    assert waited.returncode == 0, waited.stderr
    assert "training exited with status 0" in waited.stdout

    record = json.loads((record_dir / "process_0.json").read_text())
    assert record["argv"] == [
        "--config=configs/tiny.py", f"--workdir={home}/aqhash_workdirs/run1",
        "--distributed=auto", "--config.seed=3",
    ]
    assert record["cwd"] == str(home / "aqhash_jax")
    assert record["env"]["EXTRA_SETTING"] == "on"
    log_text = (home / "aqhash_logs" / "run1.log").read_text()
    assert "recording train module: process 0 started" in log_text


def test_tpu_worker_wait_reports_failure(tmp_path):
    home = tmp_path / "home"
    make_recording_project(home / "aqhash_jax")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    env = {"RECORD_DIR": str(record_dir), "FAKE_TRAIN_MODE": "fail:0:7"}
    args = ["--python", sys.executable, "--config", "configs/tiny.py", "--poll-seconds", "1"]

    started = run_on_worker(tpu_remote_command("train", args), home, env)
    assert started.returncode == 0, started.stderr
    waited = run_on_worker(tpu_remote_command("wait", args), home, env)
    assert waited.returncode == 7
    assert "training exited with status 7" in waited.stdout


def test_tpu_worker_stop_and_restart_guard(tmp_path):
    home = tmp_path / "home"
    make_recording_project(home / "aqhash_jax")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    env = {"RECORD_DIR": str(record_dir), "FAKE_TRAIN_MODE": "sleep"}
    args = ["--python", sys.executable, "--config", "configs/tiny.py", "--poll-seconds", "1"]
    train_text = tpu_remote_command("train", args)

    started = run_on_worker(train_text, home, env)
    assert started.returncode == 0, started.stderr
    pid = int((home / "aqhash_logs" / "aqhash-tpu.pid").read_text())
    for _ in range(100):
        if (record_dir / "process_0.json").exists():
            break
        time.sleep(0.1)
    assert (record_dir / "process_0.json").exists()

    again = run_on_worker(train_text, home, env)
    assert again.returncode == 1
    assert "still running" in again.stderr

    stopped = run_on_worker(tpu_remote_command("stop", args), home, env)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped run aqhash-tpu" in stopped.stdout
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    waited = run_on_worker(tpu_remote_command("wait", args), home, env)
    assert waited.returncode == 1
    assert "ended without an exit status" in waited.stderr


# ---------------------------------------------------------------------------------------------
# launch/slurm_gpu.sbatch


def srun_command(result):
    commands = printed_commands(result.stdout)
    assert len(commands) == 1
    command = commands[0]
    assert command[0] == "srun"
    assert command[-3:-1] == ["bash", "-c"]
    return command


def test_slurm_one_process_per_node():
    result = run_script(
        SLURM_SCRIPT, ["--dry-run", "--config", "configs/dogs.py", "--config.train.num_steps=10"],
        env=SLURM_ENV,
    )
    assert result.returncode == 0, result.stderr
    command = srun_command(result)
    assert command[1:6] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                            "--kill-on-bad-exit=1", "--label"]
    task_text = command[-1]
    assert "CUDA_VISIBLE_DEVICES" not in task_text
    assert task_text == (
        "exec env JAX_COORDINATOR_ADDRESS=gpu-a07:24242 python -m aqhash_jax.train"
        " --config=configs/dogs.py --workdir=workdirs/slurm-4242"
        " --coordinator_address=gpu-a07:24242 --num_processes=2"
        ' --process_id="$SLURM_PROCID" --config.train.num_steps=10'
    )
    assert "coordinator: gpu-a07:24242" in result.stderr


def test_slurm_one_process_per_gpu(tmp_path):
    project = make_recording_project(tmp_path / "project")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    result = run_script(
        SLURM_SCRIPT,
        ["--dry-run", "--per-gpu", "--config", "configs/dogs.py", "--workdir", "gs://b/run",
         "--port", "30001", "--python", sys.executable, "--env", "EXTRA_SETTING=x"],
        env=SLURM_ENV,
    )
    assert result.returncode == 0, result.stderr
    command = srun_command(result)
    assert command[1:4] == ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8"]

    # Run the task text as Slurm would for global task 11 (local task 3 on the second node).
    task_env = {**os.environ, "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
                "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "RECORD_DIR": str(record_dir)}
    task = subprocess.run(["bash", "-c", command[-1]], cwd=project, env=task_env,
                          capture_output=True, text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    record = json.loads((record_dir / "process_11.json").read_text())
    assert record["argv"] == [
        "--config=configs/dogs.py", "--workdir=gs://b/run", "--coordinator_address=gpu-a07:30001",
        "--num_processes=16", "--process_id=11",
    ]
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert record["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu-a07:30001"
    assert record["env"]["EXTRA_SETTING"] == "x"


def test_slurm_task_keeps_bound_gpu(tmp_path):
    project = make_recording_project(tmp_path / "project")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    result = run_script(
        SLURM_SCRIPT, ["--dry-run", "--per-gpu", "--config", "c.py", "--python", sys.executable],
        env=SLURM_ENV,
    )
    command = srun_command(result)
    task_env = {**os.environ, "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
                "CUDA_VISIBLE_DEVICES": "5", "RECORD_DIR": str(record_dir)}
    task = subprocess.run(["bash", "-c", command[-1]], cwd=project, env=task_env,
                          capture_output=True, text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    record = json.loads((record_dir / "process_5.json").read_text())
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.parametrize(
    "nodelist, coordinator_host",
    [
        ("gpu[07-08,12],cpu01", "gpu07"),
        ("a01,a02", "a01"),
        ("node-[001-004]-ib[2-3]", "node-001-ib2"),
        ("solo", "solo"),
    ],
)
def test_slurm_coordinator_from_nodelist(nodelist, coordinator_host):
    env = {**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist}
    result = run_script(SLURM_SCRIPT, ["--dry-run", "--config", "c.py", "--port", "1234"], env=env)
    assert result.returncode == 0, result.stderr
    task_text = srun_command(result)[-1]
    assert f"JAX_COORDINATOR_ADDRESS={coordinator_host}:1234 " in task_text
    assert f"--coordinator_address={coordinator_host}:1234 " in task_text


def test_slurm_outside_job():
    result = run_script(SLURM_SCRIPT, ["--dry-run", "--config", "c.py"])
    assert result.returncode != 0
    assert "SLURM_JOB_ID is not set" in result.stderr


def test_slurm_checks_srun_unless_dry_run(tmp_path):
    restricted_path = path_without(tmp_path, {"srun", "scontrol"})
    result = run_script(SLURM_SCRIPT, ["--config", "c.py"], env={**SLURM_ENV, "PATH": restricted_path})
    assert result.returncode != 0
    assert "'srun' not found" in result.stderr


def test_slurm_per_gpu_needs_gpu_count():
    env = {name: value for name, value in SLURM_ENV.items() if name != "SLURM_GPUS_ON_NODE"}
    result = run_script(SLURM_SCRIPT, ["--dry-run", "--per-gpu", "--config", "c.py"], env=env)
    assert result.returncode != 0
    assert "missing --gpus-per-node" in result.stderr


# ---------------------------------------------------------------------------------------------
# launch/ssh_launch.sh


def test_ssh_commands_per_host():
    result = run_script(
        SSH_SCRIPT,
        ["--dry-run", "--hosts", "alice@gpu01,gpu02", "--config", "configs/dogs.py", "--workdir",
         "gs://b/run", "--remote-dir", "/shared/aqhash_jax", "--ssh-option", "-p 2222",
         "--log-dir", "logs", "--config.seed=1"],
    )
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert commands[0] == ["mkdir", "-p", "logs"]
    for process_id, (host, command) in enumerate(zip(["alice@gpu01", "gpu02"], commands[1:])):
        assert command[:7] == ["ssh", "-tt", "-o", "BatchMode=yes", "-p", "2222", host]
        remote = shlex.split(command[7])
        assert remote[:2] == ["bash", "-c"]
        assert remote[2] == (
            "cd /shared/aqhash_jax && exec env JAX_COORDINATOR_ADDRESS=gpu01:12355 python3 -m"
            " aqhash_jax.train --config=configs/dogs.py --workdir=gs://b/run"
            " --coordinator_address=gpu01:12355 --num_processes=2"
            f" --process_id={process_id} --config.seed=1"
        )
    assert len(commands) == 3


def test_ssh_equals_form_and_passthrough():
    result = run_script(
        SSH_SCRIPT,
        ["--dry-run", "--hosts=gpu01", "--config=c.py", "--workdir=w", "--log-dir=logs",
         "--", "--config.train.epochs=2"],
    )
    assert result.returncode == 0, result.stderr
    remote = shlex.split(shlex.split(printed_commands(result.stdout)[1][-1])[2])
    assert "--config=c.py" in remote
    assert "--workdir=w" in remote
    assert remote[-1] == "--config.train.epochs=2"


@pytest.mark.parametrize(
    "script, arguments, message",
    [
        (SSH_SCRIPT, ["--hosts"], "option --hosts requires a value"),
        (SSH_SCRIPT, ["--bogus", "1"], "unknown option '--bogus'"),
        (SSH_SCRIPT, ["--local=1"], "unknown option '--local'"),
        (SSH_SCRIPT, ["train"], "unknown argument 'train'"),
        (TPU_SCRIPT, ["create", "stop"], "unexpected argument 'stop' after command 'create'"),
        (TPU_SCRIPT, ["create", "--zone"], "option --zone requires a value"),
        (TPU_SCRIPT, ["create", "--bogus=1"], "unknown option '--bogus'"),
    ],
)
def test_launch_argument_errors(script, arguments, message):
    result = run_script(script, ["--dry-run", *arguments])
    assert result.returncode != 0
    assert message in result.stderr


def test_ssh_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# workers\nnode-a\nnode-b  # second\n\nnode-c\n")
    result = run_script(
        SSH_SCRIPT,
        ["--dry-run", "--hostfile", str(hostfile), "--config", "c.py", "--workdir", "w",
         "--coordinator", "10.0.0.2", "--port", "4000", "--log-dir", str(tmp_path / "logs")],
    )
    assert result.returncode == 0, result.stderr
    ssh_commands = printed_commands(result.stdout)[1:]
    assert [command[4] for command in ssh_commands] == ["node-a", "node-b", "node-c"]
    for command in ssh_commands:
        assert "--coordinator_address=10.0.0.2:4000 --num_processes=3" in command[5]


def test_ssh_local_rejects_remote_host():
    result = run_script(
        SSH_SCRIPT, ["--dry-run", "--local", "--hosts", "localhost gpu02", "--config", "c.py",
                     "--workdir", "w"],
    )
    assert result.returncode != 0
    assert "host 'gpu02' is not localhost" in result.stderr


def test_ssh_missing_hosts():
    result = run_script(SSH_SCRIPT, ["--dry-run", "--config", "c.py", "--workdir", "w"])
    assert result.returncode != 0
    assert "missing hosts" in result.stderr


def test_ssh_local_processes_succeed(tmp_path):
    project = make_recording_project(tmp_path / "project")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    log_dir = tmp_path / "logs"
    result = run_script(
        SSH_SCRIPT,
        ["--local", "--hosts", "localhost 127.0.0.1", "--config", "c.py", "--workdir", "w",
         "--remote-dir", str(project), "--python", sys.executable, "--log-dir", str(log_dir),
         "--port", "23456"],
        env={"RECORD_DIR": str(record_dir), "FAKE_TRAIN_MODE": "ok"},
    )
    assert result.returncode == 0, result.stderr
    assert "all 2 process(es) finished" in result.stderr
    for process_id in range(2):
        record = json.loads((record_dir / f"process_{process_id}.json").read_text())
        assert record["argv"] == [
            "--config=c.py", "--workdir=w", "--coordinator_address=127.0.0.1:23456",
            "--num_processes=2", f"--process_id={process_id}",
        ]
        assert record["cwd"] == str(project)
        assert record["env"]["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
        log_text = (log_dir / f"process_{process_id}.log").read_text()
        assert f"process {process_id} started" in log_text
    assert "process 0 started" in result.stdout


def test_ssh_local_failure_stops_others(tmp_path):
    project = make_recording_project(tmp_path / "project")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    started = time.monotonic()
    result = run_script(
        SSH_SCRIPT,
        ["--local", "--hosts", "localhost localhost", "--config", "c.py", "--workdir", "w",
         "--remote-dir", str(project), "--python", sys.executable, "--log-dir",
         str(tmp_path / "logs")],
        env={"RECORD_DIR": str(record_dir), "FAKE_TRAIN_MODE": "fail:1:3"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "process 1 on localhost failed with status 3" in result.stderr
    # Process 0 sleeps for 120 s unless the launcher stops it.
    assert elapsed < 60


# ---------------------------------------------------------------------------------------------
# Two processes training together through jax.distributed, as on two hosts.


def shared_data_dir() -> Path:
    """Return the shared real-image folder (AQHASH_SHARED_DATA overrides the default)."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("AQHASH_SHARED_DATA", default))


@pytest.mark.slow
def test_two_local_processes_train(tmp_path):
    data_root = shared_data_dir() / "flowers12"
    if not data_root.is_dir():
        pytest.skip(f"flowers12 image folder not found at {data_root}; set AQHASH_SHARED_DATA")
    workdir = tmp_path / "workdir"
    log_dir = tmp_path / "logs"
    result = run_script(
        SSH_SCRIPT,
        ["--local", "--hosts", "localhost localhost", "--config", "configs/tiny.py",
         "--workdir", str(workdir), "--remote-dir", str(REPO), "--python", sys.executable,
         "--log-dir", str(log_dir), "--port", str(20000 + os.getpid() % 20000),
         "--env", "JAX_PLATFORMS=cpu", f"--config.data.root={data_root}"],
        timeout=900,
    )
    logs = "\n".join(
        f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(log_dir.glob("*.log"))
    )
    assert result.returncode == 0, result.stderr + logs
    for process_id in range(2):
        log_text = (log_dir / f"process_{process_id}.log").read_text()
        assert f"process {process_id} of 2" in log_text, logs
    assert (workdir / "metrics.json").is_file(), logs
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics, "metrics.json is empty"
    exported = list((workdir / "export").rglob("*.npy"))
    assert exported, logs


# ---------------------------------------------------------------------------------------------
# Static checks


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    scripts = [str(path) for path in sorted(LAUNCH.iterdir()) if path.suffix in (".sh", ".sbatch")]
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
