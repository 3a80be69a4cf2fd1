"""The training loop end to end: outputs, exact resume after SIGKILL, and bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import bert_mini
from bert_mini import compile_cache, train
from bert_mini.paths import REPO_ROOT
from bert_mini.train_checkpoints import ModelMismatchError

sys.path.insert(0, str(REPO_ROOT))
from configs import distill, finetune_glue, pretrain_mlm  # noqa: E402

TINY_ARGS = [
    "--config.model.variant=tiny",
    "--config.data.max_seq_length=32",
    "--config.train.global_batch_size=16",
    "--config.train.num_train_steps=8",
    "--config.train.log_every_steps=2",
    "--config.eval.every_steps=4",
    "--config.checkpoint.every_steps=4",
]


def _tiny_finetune(data_dir: pathlib.Path, steps: int = 8):
    config = finetune_glue.get_config("task=sst2,variant=tiny,runlocal")
    config.data.data_dir = str(data_dir)
    config.data.max_seq_length = 32
    config.train.num_train_steps = steps
    config.train.log_every_steps = 2
    config.eval.every_steps = 4
    config.checkpoint.every_steps = 4
    return config


def test_finetune_run_writes_logs_results_best_model_and_checkpoints(tmp_path, data_dir):
    config = _tiny_finetune(data_dir)
    config.data.tfds_dir = str(tmp_path / "tfds")
    results = train.train_and_evaluate(config, tmp_path / "run")
    run = tmp_path / "run"
    assert results["steps"] == 8 and 0.0 <= results["final"]["accuracy"] <= 1.0
    saved = json.loads((run / "results.json").read_text())
    assert saved["best_metric"] == "accuracy" and saved["config"]["data"]["task"] == "sst2"
    assert saved["best"]["step"] in (4, 8)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train_lines] == [2, 4, 6, 8]
    for key in ("loss", "learning_rate", "examples_per_s", "tokens_per_s", "grad_norm"):
        assert all(np.isfinite(line[key]) for line in train_lines), key
    assert [line["step"] for line in lines if line["split"] == "eval"] == [4, 8]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    model, _ = bert_mini.from_pretrained(run / "best", head="auto")
    assert model.head == "classification" and model.config.num_hidden_layers == 2


def _main(workdir: pathlib.Path, data_dir: pathlib.Path, extra_env=None, extra_args=()):
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"],  # 8 devices (conftest)
        "BERT_MINI_DATA": str(data_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # cache even fast compiles
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "bert_mini.main",
        "--config=configs/finetune_glue.py:task=sst2,runlocal",
        f"--workdir={workdir}",
        f"--config.data.tfds_dir={workdir.parent / 'tfds'}",
        *TINY_ARGS,
        *extra_args,
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _final_state(workdir: pathlib.Path) -> dict:
    return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / "8" / "state").resolve())


def _flat(tree, prefix=""):
    if isinstance(tree, dict | list | tuple):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out = {}
        for key, value in items:
            out.update(_flat(value, f"{prefix}{key}/"))
        return out
    return {prefix: np.asarray(tree)}


def test_sigkill_during_a_checkpoint_write_then_resume_is_exact(tmp_path, data_dir):
    reference = _main(tmp_path / "reference", data_dir)
    assert reference.returncode == 0, reference.stderr[-2000:]

    crashed = tmp_path / "crashed"
    killed = _main(crashed, data_dir, {"BERT_MINI_FAULT_SIGKILL_AT_SAVE": "4"})
    assert killed.returncode == -signal.SIGKILL
    finished = [p.name for p in (crashed / "checkpoints").iterdir() if p.name.isdigit()]
    assert "4" not in finished, "the kill must land while step 4's checkpoint is being written"
    assert not (crashed / "results.json").exists()

    entries = (crashed / "compile_cache").glob(compile_cache.ENTRY_GLOB)
    cached = {entry.name.split("-")[0] for entry in entries}
    assert "jit_finetune_step" in cached, cached  # the restart loads the killed run's executable

    resumed = _main(crashed, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _flat(_final_state(tmp_path / "reference")), _flat(_final_state(crashed))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # bitwise
    ref_results = json.loads((tmp_path / "reference" / "results.json").read_text())
    new_results = json.loads((crashed / "results.json").read_text())
    assert new_results["final"] == ref_results["final"]
    ref_lines = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    new_lines = (crashed / "metrics.jsonl").read_text().splitlines()

    def train_losses(lines: list[str], step: int) -> list[float]:
        records = [json.loads(line) for line in lines]
        return [r["loss"] for r in records if r["step"] == step and r["split"] == "train"]

    for step in (6, 8):
        assert train_losses(new_lines, step)[-1] == train_losses(ref_lines, step)[-1]


def test_unknown_config_key_is_an_error(tmp_path, data_dir):
    done = _main(tmp_path / "run", data_dir, extra_args=["--config.train.learnin_rate=1e-3"])
    assert done.returncode != 0
    assert "learnin_rate" in done.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['tsk'\]"):
        finetune_glue.get_config("tsk=sst2")


def test_batch_not_divisible_by_the_devices(tmp_path, data_dir):
    config = _tiny_finetune(data_dir)
    config.train.global_batch_size = 10
    with pytest.raises(
        ValueError, match="global batch size 10 is not divisible by the 8 data-parallel devices"
    ):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_init_checkpoint(tmp_path, data_dir):
    config = _tiny_finetune(data_dir)
    config.model.init_checkpoint = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.model.init_checkpoint not found: .*nope"):
        train.train_and_evaluate(config, tmp_path / "run")


def test_workdir_of_another_model_size_is_refused_and_kept(tmp_path, data_dir):
    config = _tiny_finetune(data_dir, steps=4)
    config.data.tfds_dir = str(tmp_path / "tfds")
    train.train_and_evaluate(config, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    config.model.variant = "mini"
    with pytest.raises(ModelMismatchError, match="this workdir trains another model"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_nan_loss_stops_without_saving(tmp_path, data_dir):
    config = _tiny_finetune(data_dir)
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.train.learning_rate = 1e30
    config.train.warmup_proportion = 0.0
    config.train.clip_norm = 0.0
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 1
    with pytest.raises(FloatingPointError, match="non-finite training metrics"):
        train.train_and_evaluate(config, tmp_path / "run")
    saved = sorted(
        int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert saved == [] or max(saved) < 8


@pytest.mark.parametrize(
    "module, arg", [(pretrain_mlm, "runlocal"), (distill, "runlocal"), (finetune_glue, "runlocal")]
)
def test_configs_document_their_command_and_accept_runlocal(module, arg):
    assert "python -m bert_mini.main --config=configs/" in module.__doc__
    config = module.get_config(arg)
    assert config.train.num_train_steps <= 100
