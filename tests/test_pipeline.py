"""Pre-trained Distillation end to end (``configs/pd_sst2.py:runlocal``), kill and rerun, the
teacher-logits cache, and the checks that must fail before any training."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import bert_mini
from bert_mini import checkpoints, inputs, pipeline
from bert_mini import teacher_logits as logits_cache
from bert_mini.data.sources import DataError
from bert_mini.model import BertConfig, count_params, create_model
from bert_mini.paths import REPO_ROOT
from bert_mini.tokenization import BertTokenizer

sys.path.insert(0, str(REPO_ROOT))
from configs import pd_glue, pd_sst2  # noqa: E402

STAGES_BEFORE_DISTILL = ("student_L-2_H-128", "teacher", "teacher_logits")


def _pipeline(workdir: pathlib.Path, data_dir: pathlib.Path, extra_env=None, extra_args=()):
    env = {
        **os.environ,
        # The three runs compile the same steps: share XLA's compilation cache between them.
        "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": os.environ["XLA_FLAGS"],  # 8 devices (conftest)
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "BERT_MINI_DATA": str(data_dir),
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "bert_mini.main",
        "--config=configs/pd_sst2.py:runlocal,method=pdf",
        f"--workdir={workdir}",
        f"--config.pipeline.tfds_dir={workdir.parent / 'tfds'}",
        "--config.stage_distill.checkpoint.every_steps=5",  # killed at 10: resumes from 5
        *extra_args,
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def _params(checkpoint: pathlib.Path) -> dict[str, np.ndarray]:
    model, _ = bert_mini.from_pretrained(checkpoint, head="auto")
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in flat}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """B: killed (SIGKILL) during a distillation checkpoint write, then rerun with the same
    command. A: an uninterrupted run of the later stages on B's student, teacher and logits."""
    root = tmp_path_factory.mktemp("pd")
    crashed = root / "crashed"
    fault = {"BERT_MINI_FAULT_SIGKILL_AT_SAVE": "10", "BERT_MINI_FAULT_WORKDIR": "/distill"}
    killed = _pipeline(crashed, data_dir, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = {
        name: (crashed / name / "manifest.json").stat().st_mtime_ns
        for name in STAGES_BEFORE_DISTILL
    }
    assert not (crashed / "distill" / "manifest.json").exists()
    rerun = _pipeline(crashed, data_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    clean = root / "clean"
    uninterrupted = _pipeline(
        clean, data_dir, extra_args=[f"--config.pipeline.shared_dir={crashed}"]
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    return {"crashed": crashed, "clean": clean, "rerun": rerun, "mtimes": before}


def test_runlocal_runs_every_stage_and_writes_results_report_and_predictions(runs, data_dir):
    crashed = runs["crashed"]
    results = json.loads((crashed / "results.json").read_text())
    assert results["method"] == "pdf" and results["task"] == "sst2"
    assert results["student"] == "L-2_H-128" and results["student_layers"] == 2
    assert list(results["stages"]) == [
        "student",
        "teacher",
        "teacher_logits",
        "distill",
        "finetune",
        "evaluate",
    ]
    assert 0.0 <= results["dev"]["accuracy"] <= 1.0
    assert 0.0 <= results["teacher"]["dev"]["accuracy"] <= 1.0
    tiny = create_model(BertConfig.from_variant("tiny"), "classification", 2, seed=0)
    assert results["student_params"] == count_params(tiny)
    assert results["stages"]["distill"]["steps"] == 20
    report = (crashed / "report.md").read_text()
    assert "| distill |" in report and "| teacher_logits |" in report
    lines = (crashed / "evaluate" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 1821
    assert [int(line.split("\t")[0]) for line in lines[1:]] == list(range(1821))
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    # The reported dev accuracy is recomputed from the exported model, not copied; batching
    # differs from the training loop's evaluation, so allow one near-tie prediction to flip.
    reported = results["dev"]["accuracy"]
    in_training = results["stages"]["finetune"]["metrics"]["accuracy"]
    assert reported == pytest.approx(in_training, abs=1.01 / 872)


def test_rerun_after_kill_reuses_stages_and_matches_an_uninterrupted_run(runs):
    crashed, clean = runs["crashed"], runs["clean"]
    log = runs["rerun"].stderr
    for name in ("student", "teacher", "teacher_logits"):
        assert f"stage {name}: done before, reusing" in log
    for name, mtime in runs["mtimes"].items():
        assert (crashed / name / "manifest.json").stat().st_mtime_ns == mtime, name
    assert f"resumed from {crashed / 'distill' / 'checkpoints'} at step 5" in log
    ours = json.loads((crashed / "results.json").read_text())
    theirs = json.loads((clean / "results.json").read_text())
    assert ours["dev"] == theirs["dev"]
    for stage in ("distill", "finetune"):
        resumed, straight = _params(crashed / stage / "best"), _params(clean / stage / "best")
        assert resumed.keys() == straight.keys()
        for name, value in resumed.items():
            np.testing.assert_array_equal(value, straight[name], err_msg=f"{stage}: {name}")


def test_cached_teacher_logits_equal_the_teacher_run_online(runs):
    """Tolerance 1e-4 absolute: the cache batches by length (less padding), which reorders
    float sums; masked padding itself changes nothing."""
    crashed = runs["crashed"]
    cached = logits_cache.load_cache(crashed / "teacher_logits" / "cache")
    config = pd_sst2.get_config("runlocal,method=pdf")
    config.workdir = str(crashed)
    plan = pipeline.Plan(config, crashed, crashed, pipeline.task_info("sst2"), ())
    data_config = pipeline._distill_data_config(plan)
    teacher, tokenizer = bert_mini.from_pretrained(
        crashed / "teacher" / "best", head="classification", num_labels=2
    )
    arrays = inputs.transfer_arrays(data_config, tokenizer, inputs.transfer_examples(data_config))
    online = np.concatenate(
        [
            np.asarray(
                teacher(
                    arrays["input_ids"][i : i + 64],
                    arrays["token_type_ids"][i : i + 64],
                    arrays["attention_mask"][i : i + 64],
                ).logits
            )
            for i in range(0, len(arrays["input_ids"]), 64)
        ]
    )
    assert cached.shape == online.shape == (512, 2)
    np.testing.assert_allclose(cached, online, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- logits cache


def _fake_teacher(calls: list):
    def compute(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        rows = np.arange(start, stop, dtype=np.float32)[:, None]
        return np.concatenate([rows, -rows, rows * 0.5, np.ones_like(rows)], axis=1)

    return compute


def test_logits_cache_round_trip_resume_top_k_and_fingerprint(tmp_path):
    calls: list = []
    manifest = logits_cache.write_cache(
        tmp_path / "dense", 10, _fake_teacher(calls), shard_size=4, fingerprint_value="abc"
    )
    assert calls == [(0, 4), (4, 8), (8, 10)] and manifest["num_shards"] == 3
    dense = logits_cache.load_cache(tmp_path / "dense", fingerprint_value="abc")
    np.testing.assert_array_equal(dense, _fake_teacher([])(0, 10))
    # A rerun of a finished cache computes nothing; another fingerprint is an error.
    calls.clear()
    logits_cache.write_cache(tmp_path / "dense", 10, _fake_teacher(calls), shard_size=4)
    assert calls == []
    with pytest.raises(ValueError, match="made for another teacher or transfer set"):
        logits_cache.load_cache(tmp_path / "dense", fingerprint_value="xyz")
    # A run killed after two shards: the rerun computes only the missing one.
    (tmp_path / "dense" / "manifest.json").unlink()
    (tmp_path / "dense" / "logits-00002.npy").unlink()
    logits_cache.write_cache(tmp_path / "dense", 10, _fake_teacher(calls), shard_size=4)
    assert calls == [(8, 10)]
    # Top-2: the two largest logits stay, the rest get MISSING_LOGIT (softmax ~0).
    logits_cache.write_cache(tmp_path / "top2", 10, _fake_teacher([]), shard_size=4, top_k=2)
    sparse = logits_cache.load_cache(tmp_path / "top2", num_classes=4)
    full = _fake_teacher([])(0, 10)
    for row in range(10):
        keep = np.argsort(-full[row], kind="stable")[:2]
        np.testing.assert_array_equal(sparse[row, keep], full[row, keep])
        assert (np.delete(sparse[row], keep) == logits_cache.MISSING_LOGIT).all()
    with pytest.raises(ValueError, match="the transfer set is empty"):
        logits_cache.write_cache(tmp_path / "empty", 0, _fake_teacher([]), shard_size=4)


# ----------------------------------------------------------------------------- bad input


def _save_classifier(path: pathlib.Path, vocab_path: pathlib.Path, head: str, labels: int):
    config = BertConfig.from_variant("tiny")
    model = create_model(config, head, labels, seed=0)
    checkpoints.save_pretrained(model, BertTokenizer(vocab_path), path, "bert_mini")
    return path


def _config(tmp_path: pathlib.Path, arg: str, **pipeline_fields):
    config = pd_sst2.get_config(arg)
    config.workdir = str(tmp_path / "run")
    config.pipeline.tfds_dir = str(tmp_path / "tfds")
    for key, value in pipeline_fields.items():
        config.pipeline[key] = value
    return config


def _nothing_written(tmp_path: pathlib.Path) -> bool:
    return not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("head", "labels", "message"),
    [
        ("classification", 3, r"predicts 3 label\(s\) \(classification\), but sst2 has 2"),
        ("regression", 1, r"predicts 1 label\(s\) \(regression\), but sst2 has 2"),
        (None, 2, "has no classifier head"),
    ],
)
def test_teacher_with_another_label_set_fails_before_any_work(
    tmp_path, vocab_path, head, labels, message
):
    teacher = _save_classifier(tmp_path / "teacher", vocab_path, head, labels)
    config = _config(tmp_path, "runlocal,method=pd", teacher=str(teacher))
    with pytest.raises(pipeline.PipelineError, match=message):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert _nothing_written(tmp_path)


def test_student_with_another_vocabulary_fails_before_any_work(tmp_path, vocab_path):
    teacher = _save_classifier(tmp_path / "teacher", vocab_path, "classification", 2)
    words = vocab_path.read_text().splitlines()
    other_vocab = tmp_path / "cased-vocab.txt"
    other_vocab.write_text("\n".join([*words[:1000], "Hello", *words[1001:]]) + "\n")
    student = _save_classifier(tmp_path / "student", other_vocab, "mlm", 2)
    config = _config(
        tmp_path, "runlocal,method=pd", teacher=str(teacher), student_init=str(student)
    )
    with pytest.raises(pipeline.PipelineError, match="first difference at id 1000"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert _nothing_written(tmp_path)


def test_transfer_set_empty_after_dedup_fails_before_any_work(tmp_path, vocab_path, data_dir):
    glue = tmp_path / "data" / "glue" / "SST-2"
    glue.mkdir(parents=True)
    dev = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()
    (glue / "dev.tsv").write_text("\n".join(dev[:50]) + "\n")
    (glue / "train.tsv").write_text("\n".join(dev[:50]) + "\n")  # every train text is in dev
    (glue / "test.tsv").write_text("index\tsentence\n0\tsomething else entirely .\n")
    teacher = _save_classifier(tmp_path / "teacher", vocab_path, "classification", 2)
    config = _config(tmp_path, "runlocal,method=d", teacher=str(teacher))
    config.pipeline.data_dir = str(tmp_path / "data")
    config.stage_distill.data.transfer = "task_train_text"
    with pytest.raises(DataError, match="the transfer set is empty after length filtering and"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert _nothing_written(tmp_path)


def test_unknown_method_argument_and_missing_checkpoint_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"configs/pd_sst2.py: method='kd'; choose one of"):
        pd_sst2.get_config("method=kd")
    with pytest.raises(ValueError, match=r"configs/pd_glue.py: unknown argument\(s\) \['epochs'\]"):
        pd_glue.get_config("task=mrpc,epochs=3")
    config = _config(tmp_path, "runlocal,method=pf", student_init=str(tmp_path / "nope"))
    with pytest.raises(pipeline.PipelineError, match="pipeline.student_init: checkpoint not found"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert _nothing_written(tmp_path)


def test_a_stage_made_with_other_settings_is_never_reused(tmp_path):
    stage = tmp_path / "stage"
    first = pipeline.run_stage("distill", stage, {"train": {"steps": 20}}, lambda: {"x": 1})
    assert first["status"] == "done" and first["outputs"] == {"x": 1}
    again = pipeline.run_stage("distill", stage, {"train": {"steps": 20}}, lambda: {"x": 2})
    assert again["status"] == "reused" and again["outputs"] == {"x": 1}
    with pytest.raises(pipeline.PipelineError, match=r"other settings \(train.steps: 20 -> 40\)"):
        pipeline.run_stage("distill", stage, {"train": {"steps": 40}}, lambda: {"x": 3})
    with pytest.raises(pipeline.PipelineError, match=r"other settings \(train.steps: 20 -> None\)"):
        pipeline.run_stage("distill", stage, {"train": {"epochs": 1}}, lambda: {"x": 3})
    # A field added to the configs since the stage ran does not invalidate it.
    newer = {"train": {"steps": 20, "new_field": 0}}
    assert pipeline.run_stage("distill", stage, newer, lambda: {"x": 4})["outputs"] == {"x": 1}


def test_pd_glue_configs_pick_heads_and_transfer_sets():
    stsb = pd_glue.get_config("task=stsb,method=pdf")
    assert stsb.stage_distill.model.head == "regression"
    assert stsb.stage_distill.data.transfer == "task_train_text"
    assert pipeline.task_info("stsb").num_labels == 1
    assert pipeline.task_info("mnli").num_labels == 3
    sst2 = pd_sst2.get_config("student=small")
    assert sst2.pipeline.student == "L-4_H-512" and sst2.stage_distill.data.transfer == "movie_sst2"
