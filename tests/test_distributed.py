"""Multi-host runs, proven on one machine: 2 processes x 4 fake CPU devices (JAX's distributed
runtime through ``launch/local.sh``) train exactly like 1 process x 8 devices, and a checkpoint
written by the 2-process run resumes in a 1-process run.

Also the start-up decision of ``bert_mini.distributed`` (env switch, explicit settings, cluster
detection) and the local launcher's commands, without starting anything.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bert_mini import distributed, inputs, launch_local
from bert_mini.data.pipeline import HostShard
from bert_mini.paths import REPO_ROOT
from bert_mini.tokenization import BertTokenizer

sys.path.insert(0, str(REPO_ROOT))
from configs import finetune_glue, pretrain_mlm  # noqa: E402

STEPS = 6
RTOL = 1e-5  # fp32, highest matmul precision: only the summation order differs

PRETRAIN_ARGS = [
    "--config=configs/pretrain_mlm.py:variant=tiny,runlocal",
    "--config.data.train_files=pretrain/wikitext-2-raw/wiki.valid.raw",
    "--config.data.eval_files=",
    "--config.data.max_seq_length=32",
    "--config.data.max_predictions_per_seq=8",
    "--config.data.max_examples=512",
]
FINETUNE_ARGS = [
    "--config=configs/finetune_glue.py:task=mrpc,variant=tiny,runlocal",
    "--config.data.max_seq_length=32",
]
COMMON_ARGS = [
    f"--config.train.num_train_steps={STEPS}",
    "--config.train.log_every_steps=1",
    "--config.checkpoint.every_steps=3",
    "--config.eval.every_steps=1000",  # evaluate once, at the last step
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """A persistent XLA cache shared by this module's runs: a program compiled by one run (the
    1x8 reference) is loaded by the next (the resumed run), which saves a third of a run."""
    return tmp_path_factory.mktemp("xla_cache")


def _env(data_dir: pathlib.Path, cache: pathlib.Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BERT_MINI_DATA": str(data_dir),
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as tests/conftest.py sets in-process
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHON": sys.executable,
        **extra,
    }


def _run(
    args: list[str], workdir: pathlib.Path, data_dir: pathlib.Path, cache: pathlib.Path, *, two
) -> str:
    """One training run, 1 process x 8 devices or 2 x 4 via launch/local.sh; returns its log."""
    if two:
        command = [str(REPO_ROOT / "launch" / "local.sh"), "--processes=2"]
        command += ["--devices-per-process=4", "--", *args, f"--workdir={workdir}"]
        env = _env(data_dir, cache)
    else:
        command = [sys.executable, "-m", "bert_mini.main", *args, f"--workdir={workdir}"]
        env = _env(
            data_dir,
            cache,
            XLA_FLAGS=os.environ["XLA_FLAGS"],  # 8 devices and the collective timeout (conftest)
            BERT_MINI_DISTRIBUTED="0",
        )
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    if two:  # both processes joined one job of 8 devices
        for index in (0, 1):
            assert f"process {index}/2 on cpu: 4 local / 8 global devices" in done.stdout
    return done.stdout + done.stderr


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, so the last line of a step wins."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def _params(workdir: pathlib.Path, step: int = STEPS) -> dict[str, np.ndarray]:
    """The checkpoint's parameters as numpy, whatever topology wrote them."""
    path = (workdir / "checkpoints" / str(step) / "state").resolve()
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device), metadata
    )
    state = checkpointer.restore(path, target)
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(key): np.asarray(value) for key, value in leaves}


def _assert_same_run(got: pathlib.Path, want: pathlib.Path, steps=range(1, STEPS + 1)) -> None:
    got_losses, want_losses = _train_losses(got), _train_losses(want)
    assert sorted(want_losses) == list(range(1, STEPS + 1))
    for step in steps:
        np.testing.assert_allclose(
            got_losses[step], want_losses[step], rtol=RTOL, err_msg=f"loss at step {step}"
        )
    got_params, want_params = _params(got), _params(want)
    assert got_params.keys() == want_params.keys()
    earlier = _params(want, step=3)
    moved = 0
    for name, want_value in want_params.items():
        got_value = got_params[name]
        assert np.all(np.isfinite(got_value)), name
        if "['key']['bias']" in name:
            # Softmax ignores a bias shared by all keys: its gradient is exactly 0 and what
            # Adam makes of the rounding noise differs with the summation order.
            continue
        error = np.linalg.norm(got_value - want_value) / max(np.linalg.norm(want_value), 1e-30)
        assert error <= RTOL, f"{name}: relative difference {error:.2e}"
        moved += int(not np.array_equal(want_value, earlier[name]))
    assert moved > 0, "steps 4-6 changed no parameter: the comparison would prove nothing"


def test_pretraining_on_2x4_processes_matches_1x8_and_resumes_in_one_process(
    tmp_path, data_dir, compile_cache
):
    args = [*PRETRAIN_ARGS, *COMMON_ARGS, f"--config.data.cache_dir={tmp_path / 'cache'}"]
    # The 2-process run goes first, so it builds the shared example cache (process 0 first).
    _run(args, tmp_path / "two", data_dir, compile_cache, two=True)
    _run(args, tmp_path / "one", data_dir, compile_cache, two=False)
    _assert_same_run(tmp_path / "two", tmp_path / "one")

    # The 2-process run's step-3 checkpoint, resumed by one process with 8 devices.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    (resumed / "results.json").unlink()
    log = _run(args, resumed, data_dir, compile_cache, two=False)
    assert "resumed from" in log and "at step 3" in log
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][STEPS:] == [4, 5, 6]  # steps 4-6 rerun
    _assert_same_run(resumed, tmp_path / "one", steps=range(4, STEPS + 1))
    assert json.loads((resumed / "results.json").read_text())["steps"] == STEPS


def test_finetuning_on_2x4_processes_matches_1x8(tmp_path, data_dir, compile_cache):
    args = [*FINETUNE_ARGS, *COMMON_ARGS, f"--config.data.tfds_dir={tmp_path / 'tfds'}"]
    # The 2-process run goes first, so it builds the TFDS dataset (process 0 first).
    _run(args, tmp_path / "two", data_dir, compile_cache, two=True)
    _run(args, tmp_path / "one", data_dir, compile_cache, two=False)
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two_results["final"].keys() == one_results["final"].keys()
    assert "accuracy" in one_results["final"]
    for name, value in one_results["final"].items():
        np.testing.assert_allclose(two_results["final"][name], value, rtol=RTOL, err_msg=name)
    # The best model is exported once, by process 0, from parameters gathered across processes.
    assert (tmp_path / "two" / "best" / "vocab.txt").is_file()
    assert json.loads((tmp_path / "two" / "best.json").read_text())["step"] == STEPS


# ----------------------------------------------------------------------------- per-host data


def _host_batches(config, tokenizer, shard: HostShard, steps: int):
    data = inputs.make_inputs(config, tokenizer, shard)
    train = [next(data.train) for _ in range(steps)]
    return train, list(data.eval_batches()), data.train.position


def _tiny_data_config(mode: str, tmp_path: pathlib.Path, data_dir: pathlib.Path):
    if mode == "pretrain":
        config = pretrain_mlm.get_config("variant=tiny,runlocal")
        config.data.train_files = config.data.eval_files = "pretrain/wikitext-2-raw/wiki.valid.raw"
        config.data.max_seq_length = 32
        config.data.max_examples = 200
        config.data.max_eval_examples = 40  # not a multiple of the eval batch: padding
        config.data.cache_dir = str(tmp_path / "cache")
    else:
        config = finetune_glue.get_config("task=mrpc,variant=tiny,runlocal")
        config.data.max_seq_length = 128  # padding trimmed per batch: widths vary
        config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.data_dir = str(data_dir)
    config.train.global_batch_size = 8
    config.eval.global_batch_size = 16
    return config


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_two_hosts_rows_put_together_are_the_one_host_batches(mode, tmp_path, data_dir, vocab_path):
    """Same global batches (masks, trimmed width, eval padding) whatever the process count."""
    config = _tiny_data_config(mode, tmp_path, data_dir)
    tokenizer = BertTokenizer.from_pretrained(vocab_path)
    steps = 30  # past the end of the first epoch of the capped pre-training set
    whole_train, whole_eval, whole_position = _host_batches(config, tokenizer, HostShard(), steps)
    parts = [_host_batches(config, tokenizer, HostShard(index, 2), steps) for index in (0, 1)]
    assert parts[0][2] == parts[1][2] == whole_position
    assert len(parts[0][1]) == len(parts[1][1]) == len(whole_eval) > 1
    for split, whole in ((0, whole_train), (1, whole_eval)):
        for step, batch in enumerate(whole):
            assert batch.keys() == parts[0][split][step].keys()
            for key, value in batch.items():
                halves = [part[split][step][key] for part in parts]
                assert halves[0].shape[0] == value.shape[0] // 2, (key, step)
                np.testing.assert_array_equal(
                    np.concatenate(halves), value, err_msg=f"{key} {step}"
                )
    if mode == "pretrain":  # the masks really are drawn per batch, not copied
        assert not np.array_equal(
            whole_train[0]["masked_positions"], whole_train[1]["masked_positions"]
        )
    else:
        widths = {batch["input_ids"].shape[1] for batch in whole_train}
        assert len(widths) > 1, "trimming must vary the width for this test to mean anything"


# ----------------------------------------------------------------------------- start-up decision


def _settings(**env: str) -> distributed.Settings:
    return distributed.Settings.from_env(env)


def test_env_switch_and_explicit_settings_decide_the_start():
    never = lambda: "slurm"  # noqa: E731  (a cluster that must be ignored)
    none = lambda: None  # noqa: E731
    settings = _settings(
        BERT_MINI_DISTRIBUTED="1",
        BERT_MINI_COORDINATOR="10.0.0.1:1234",
        BERT_MINI_NUM_PROCESSES="4",
        BERT_MINI_PROCESS_ID="3",
    )
    assert settings == distributed.Settings("1", "10.0.0.1:1234", 4, 3)
    assert distributed.should_initialize(settings, False, none) == (
        True,
        "BERT_MINI_DISTRIBUTED=1",
    )
    assert (
        distributed.should_initialize(_settings(BERT_MINI_DISTRIBUTED="0"), False, never)[0]
        is False
    )
    assert distributed.should_initialize(_settings(), True, none) == (True, "--jax_distributed")
    assert distributed.should_initialize(_settings(), False, none)[0] is False
    assert distributed.should_initialize(_settings(BERT_MINI_DISTRIBUTED="auto"), False, never) == (
        True,
        "detected cluster: slurm",
    )
    with pytest.raises(ValueError, match="--jax_distributed contradicts BERT_MINI_DISTRIBUTED=0"):
        distributed.should_initialize(_settings(BERT_MINI_DISTRIBUTED="0"), True, none)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"BERT_MINI_DISTRIBUTED": "yes"}, "BERT_MINI_DISTRIBUTED='yes': use 1, 0 or auto"),
        (
            {"BERT_MINI_COORDINATOR": "localhost"},
            "BERT_MINI_COORDINATOR='localhost': expected host:port",
        ),
        (
            {"BERT_MINI_COORDINATOR": "h:99999"},
            "BERT_MINI_COORDINATOR='h:99999': expected host:port",
        ),
        ({"BERT_MINI_NUM_PROCESSES": "0"}, "BERT_MINI_NUM_PROCESSES='0': expected an integer >= 1"),
        ({"BERT_MINI_PROCESS_ID": "-1"}, "BERT_MINI_PROCESS_ID='-1': expected an integer >= 0"),
        (
            {"BERT_MINI_NUM_PROCESSES": "2", "BERT_MINI_PROCESS_ID": "2"},
            "BERT_MINI_PROCESS_ID=2 is not below BERT_MINI_NUM_PROCESSES=2",
        ),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(env, message):
    with pytest.raises(ValueError) as error:
        distributed.Settings.from_env(env)
    assert str(error.value) == message


def test_cluster_detection_uses_jax_and_ignores_single_task_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(name, "7" if name != "SLURM_STEP_NODELIST" else "node[003-004]")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a plain single-process run
    assert distributed.detected_cluster() is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert distributed.detected_cluster() is None


def test_single_process_start_and_topology(monkeypatch):
    monkeypatch.setenv("BERT_MINI_DISTRIBUTED", "0")
    assert distributed.maybe_initialize() is False
    info = distributed.log_topology()
    assert info["process_index"] == 0 and info["process_count"] == 1
    assert info["local_device_count"] == info["global_device_count"] == 8


# ----------------------------------------------------------------------------- local launcher


def test_local_launcher_gives_each_process_its_settings_and_devices():
    base = {"XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=8", "A": "1"}
    env = launch_local.process_env(base, index=1, processes=3, devices=4, port=4321)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=4"
    assert env["BERT_MINI_COORDINATOR"] == "localhost:4321"
    assert (env["BERT_MINI_NUM_PROCESSES"], env["BERT_MINI_PROCESS_ID"]) == ("3", "1")
    assert env["BERT_MINI_DISTRIBUTED"] == "1" and env["JAX_PLATFORMS"] == "cpu" and env["A"] == "1"
    settings = distributed.Settings.from_env(env)
    assert (settings.num_processes, settings.process_id) == (3, 1)


def test_local_launcher_dry_run_prints_every_command(capsys):
    assert (
        launch_local.main(["--processes=3", "--port=2222", "--dry-run", "--", "--config=c.py"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for index, line in enumerate(lines):
        assert f"BERT_MINI_PROCESS_ID={index}" in line
        assert "BERT_MINI_COORDINATOR=localhost:2222" in line
        assert line.endswith("-m bert_mini.main --config=c.py")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--processes=0", "--", "x"], "--processes must be >= 1, not 0"),
        (["--devices-per-process=0", "--", "x"], "--devices-per-process must be >= 1, not 0"),
        (["--port=70000", "--", "x"], "--port must be in [0, 65535], not 70000"),
        (["--processes=2"], "give the module's arguments after --"),
    ],
)
def test_local_launcher_checks_its_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch_local.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    """A failed process must not leave its peers waiting for it forever."""
    marker = tmp_path / "survivor"
    commands = [
        [sys.executable, "-c", "import sys; print('failing'); sys.exit(3)"],
        [sys.executable, "-c", f"import time; time.sleep(60); open({str(marker)!r}, 'w')"],
    ]
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        status = launch_local.run(commands, [dict(os.environ)] * 2, out=stream)
    assert status == 3
    text = out.read_text()
    assert "[0] failing" in text and "process 0 exited with status 3" in text
    assert not marker.exists()
