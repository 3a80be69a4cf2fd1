"""SQuAD v1.1 through the training loop and the PD pipeline: span arrays and answer decoding on
real dev questions, a tiny fine-tuning run (``configs/finetune_squad.py:runlocal``) and span
distillation end to end (``configs/pd_squad.py:runlocal``) from cached teacher span logits.

Only dev-v1.1.json is staged, so runlocal trains on ``validation[:50%]``; evaluation here uses
317 real questions (``validation[50%:53%]``) to keep the module near a minute on a laptop CPU.
The PD run uses tiny random BERTs as teacher and student inits (the pipeline is under test, not
MiniLM's quality).
"""

import json
import math
import pathlib
import sys

import numpy as np
import pytest
import tensorflow as tf

import bert_mini
from bert_mini import checkpoints, pipeline, squad_inputs, train
from bert_mini import teacher_logits as logits_cache
from bert_mini.data.sources import DataError
from bert_mini.model import BertConfig, create_model
from bert_mini.paths import REPO_ROOT
from bert_mini.tokenization import BertTokenizer

sys.path.insert(0, str(REPO_ROOT))
from configs import finetune_squad, pd_squad  # noqa: E402

EVAL_SLICE = "validation[50%:53%]"  # 317 real dev questions
N_EVAL_QUESTIONS = 317
SEQ = 128
TASK_STAGES = ("stage_teacher", "stage_distill", "stage_finetune")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds_squad")


@pytest.fixture(scope="module")
def tokenizer(vocab_path) -> BertTokenizer:
    return BertTokenizer(vocab_path)


@pytest.fixture(scope="module")
def dev_windows(data_dir, tfds_dir, tokenizer):
    config = finetune_squad.get_config("runlocal")
    config.data.data_dir = str(data_dir)
    config.data.tfds_dir = str(tfds_dir)
    return squad_inputs.squad_windows(config, tokenizer, EVAL_SLICE, training=True)


def _oracle(features, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logit 10 at every window's labelled start/end (+ ``shift`` tokens), 0 elsewhere."""
    n = len(features)
    start, end = np.zeros((n, SEQ), np.float32), np.zeros((n, SEQ), np.float32)
    has_answer = features.start_positions_N > 0
    rows = np.arange(n)[has_answer]
    start[rows, np.minimum(features.start_positions_N[has_answer] + shift, SEQ - 1)] = 10.0
    end[rows, np.minimum(features.end_positions_N[has_answer] + shift, SEQ - 1)] = 10.0
    return start, end


# ----------------------------------------------------------------------------- arrays, decoding


def test_perfect_span_logits_decode_to_exact_match_and_f1_of_100(dev_windows):
    features, examples = dev_windows
    assert len(examples) == N_EVAL_QUESTIONS
    assert len(features) > len(examples)  # long paragraphs: several windows per question
    assert features.input_ids_NxS.shape == (len(features), SEQ)
    start, end = _oracle(features)
    # Through the cache layout ([N, 2*S]: start then end) and back, as distillation sees it.
    joined = squad_inputs.join_span_logits(start, end)
    assert joined.shape == (len(features), 2 * SEQ)
    start_back, end_back = squad_inputs.split_span_logits(joined)
    predictions = squad_inputs.best_spans(features, start_back, end_back)
    assert set(predictions) == {example["id"] for example in examples}
    assert squad_inputs.span_metrics(predictions, examples) == {"exact_match": 1.0, "f1": 1.0}
    # A higher start logit on a token whose window is not its max-context window is no
    # candidate (run_squad.py): the answers stay the gold ones.
    decoys = 0
    for row, window in enumerate(features.windows):
        is_context = np.array([offset is not None for offset in window.offset_mapping])
        outside = np.flatnonzero(is_context & ~window.token_is_max_context)
        if len(outside):
            start[row, outside[0]] = 50.0
            decoys += 1
    assert decoys > 100
    predictions = squad_inputs.best_spans(features, start, end)
    assert squad_inputs.span_metrics(predictions, examples) == {"exact_match": 1.0, "f1": 1.0}


def test_shifted_or_too_long_spans_score_lower(dev_windows):
    features, examples = dev_windows
    shifted = squad_inputs.span_metrics(
        squad_inputs.best_spans(features, *_oracle(features, shift=1)), examples
    )
    assert shifted["exact_match"] < 0.2 and 0.3 < shifted["f1"] < 0.7  # measured: 0.08, 0.50
    assert shifted["exact_match"] < shifted["f1"]
    # One-token answers only: every longer gold answer is missed.
    short = squad_inputs.span_metrics(
        squad_inputs.best_spans(features, *_oracle(features), max_answer_length=1), examples
    )
    assert short["exact_match"] < 0.4 and short["f1"] < 0.5  # measured: 0.21, 0.30
    # Logits from the wrong windows are a ValueError, not a silent misalignment.
    start, end = _oracle(features)
    with pytest.raises(ValueError, match="do not match"):
        squad_inputs.best_spans(features, start[1:], end[1:])


def test_span_batch_transform_splits_and_trims_teacher_logits():
    lengths = np.array([3, 5])
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
    logits = np.arange(2 * 32, dtype=np.float32).reshape(2, 32)
    batch = {
        "input_ids": tf.constant(mask * 7),
        "token_type_ids": tf.constant(np.zeros_like(mask)),
        "attention_mask": tf.constant(mask),
        "teacher_logits": tf.constant(logits),
    }
    out = squad_inputs.span_batch_transform(4)(batch, 0)
    assert "teacher_logits" not in out
    assert out["input_ids"].shape == (2, 8)  # longest row 5, rounded up to 8
    np.testing.assert_array_equal(out["teacher_start_logits"].numpy(), logits[:, :8])
    np.testing.assert_array_equal(out["teacher_end_logits"].numpy(), logits[:, 16:24])
    untrimmed = squad_inputs.span_batch_transform(0)(batch, 0)
    np.testing.assert_array_equal(untrimmed["teacher_end_logits"].numpy(), logits[:, 16:])


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_squad_runlocal_reports_finite_loss_and_em_f1(tmp_path, data_dir, tfds_dir):
    config = finetune_squad.get_config("runlocal")
    assert config.model.head == "span" and config.data.train_split == "validation[:50%]"
    config.data.data_dir = str(data_dir)
    config.data.tfds_dir = str(tfds_dir)
    config.data.eval_split = EVAL_SLICE
    config.data.max_examples = 256
    config.train.num_train_steps = 4
    config.train.log_every_steps = 2
    config.eval.every_steps = 4
    config.checkpoint.every_steps = 4
    results = train.train_and_evaluate(config, tmp_path / "run")
    assert results["steps"] == 4 and results["best_metric"] == "f1"
    final = results["final"]
    assert math.isfinite(final["loss"]) and final["loss"] > 0
    assert 0.0 <= final["exact_match"] <= final["f1"] <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"] == final and saved["best"]["step"] == 4
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines if line["split"] == "train"] == [2, 4]
    assert all(math.isfinite(line["loss"]) for line in lines)
    model, _ = bert_mini.from_pretrained(tmp_path / "run" / "best", head="auto")
    assert model.head == "span"


# ----------------------------------------------------------------------------- PD pipeline


@pytest.fixture(scope="module")
def inits(tmp_path_factory, vocab_path) -> dict[str, pathlib.Path]:
    """Tiny random BERTs (no task head) as the teacher to fine-tune and the student."""
    root = tmp_path_factory.mktemp("inits")
    paths = {}
    for name, seed in (("teacher_init", 1), ("student_init", 2)):
        model = create_model(BertConfig.from_variant("tiny"), "mlm", 2, seed=seed)
        checkpoints.save_pretrained(model, BertTokenizer(vocab_path), root / name, "bert_mini")
        paths[name] = root / name
    return paths


def _pd_config(workdir: pathlib.Path, tfds_dir: pathlib.Path, inits, extra: str = ""):
    arg = f"runlocal,method=pd,teacher_init={inits['teacher_init']}"
    config = pd_squad.get_config(f"{arg},student_init={inits['student_init']}{extra}")
    config.workdir = str(workdir)
    config.pipeline.tfds_dir = str(tfds_dir)
    for section in TASK_STAGES:
        config[section].data.eval_split = EVAL_SLICE
    config.stage_teacher.data.max_examples = 256  # questions of D_L
    config.stage_distill.data.max_examples = 256  # questions of D_T
    return config


@pytest.fixture(scope="module")
def pd_run(tmp_path_factory, tfds_dir, inits):
    workdir = tmp_path_factory.mktemp("pd_squad") / "run"
    config = _pd_config(workdir, tfds_dir, inits)
    results = pipeline.run_pipeline(config, workdir)
    return {"workdir": workdir, "config": config, "results": results}


def test_pd_squad_runlocal_distils_from_cached_span_logits(pd_run):
    workdir = pd_run["workdir"]
    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == "squad" and results["method"] == "pd"
    assert results["main_metric"] == "f1" and results["student"] == "L-2_H-128"
    assert list(results["stages"]) == [
        "student",
        "teacher",
        "teacher_logits",
        "distill",
        "evaluate",
    ]
    assert results["stages"]["distill"]["steps"] == 20
    for scores in (results["dev"], results["teacher"]["dev"]):
        assert 0.0 <= scores["exact_match"] <= scores["f1"] <= 1.0
    # The distill stage trained on the cache, with no teacher forward in the step.
    distill = json.loads((workdir / "distill" / "manifest.json").read_text())
    assert distill["settings"]["distill"]["teacher_logits"] == str(
        workdir / "teacher_logits" / "cache"
    )
    assert distill["settings"]["model"]["head"] == "span"
    lines = (workdir / "distill" / "metrics.jsonl").read_text().splitlines()
    train_lines = [json.loads(line) for line in lines if '"split": "train"' in line]
    assert train_lines and all(math.isfinite(line["soft_loss"]) for line in train_lines)
    # The evaluate stage decodes the exported model again: same F1 as the loop's last eval, up
    # to one question whose two best spans are near-tied.
    in_training = results["stages"]["distill"]["metrics"]["f1"]
    assert results["dev"]["f1"] == pytest.approx(in_training, abs=1.01 / N_EVAL_QUESTIONS)
    report = (workdir / "report.md").read_text()
    assert f"Dev f1: **{100 * results['dev']['f1']:.2f}**" in report
    predictions = json.loads(pathlib.Path(results["dev_predictions"]).read_text())
    assert len(predictions) == N_EVAL_QUESTIONS
    assert results["test_predictions"] is None


def test_cached_teacher_span_logits_equal_the_teacher_run_online(pd_run, tokenizer):
    """Tolerance 1e-4 absolute: the cache batches by length (less padding), which reorders float
    sums; positions outside the attention mask are stored as MISSING_LOGIT."""
    workdir, config = pd_run["workdir"], pd_run["config"]
    cached = logits_cache.load_cache(workdir / "teacher_logits" / "cache")
    plan = pipeline.Plan(config, workdir, workdir, pipeline.task_info("squad"), ())
    features, _ = squad_inputs.transfer_windows(pipeline._distill_data_config(plan), tokenizer)
    assert cached.shape == (len(features), 2 * SEQ) and len(features) > 256
    assert cached.shape[0] > config.pipeline.logits_shard_size  # more than one shard
    teacher, _ = bert_mini.from_pretrained(workdir / "teacher" / "best", head="span")
    # The first and the last 128 windows (both shards), full width, eager: no bucketing.
    rows = np.r_[0:128, len(features) - 128 : len(features)]
    arrays = {key: value[rows] for key, value in features.arrays().items()}
    starts, ends = [], []
    for i in range(0, len(rows), 64):
        output = teacher(*(arrays[key][i : i + 64] for key in squad_inputs.TOKEN_FEATURES))
        starts.append(np.asarray(output.start_logits))
        ends.append(np.asarray(output.end_logits))
    online_start, online_end = np.concatenate(starts), np.concatenate(ends)
    cached_start, cached_end = squad_inputs.split_span_logits(cached[rows])
    real = arrays["attention_mask"] == 1
    np.testing.assert_allclose(cached_start[real], online_start[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(cached_end[real], online_end[real], atol=1e-4, rtol=0)
    assert (cached_start[~real] == logits_cache.MISSING_LOGIT).all()
    assert (cached_end[~real] == logits_cache.MISSING_LOGIT).all()


# ----------------------------------------------------------------------------- bad input


def test_missing_train_file_fails_before_any_work(tmp_path, tfds_dir, inits):
    config = _pd_config(tmp_path / "run", tfds_dir, inits)
    for section in TASK_STAGES:
        config[section].data.train_split = "train"  # train-v1.1.json is not staged
    with pytest.raises(DataError, match=r"expected data file not found: .*train-v1\.1\.json"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_teacher_without_span_head_fails_before_any_work(tmp_path, tfds_dir, inits, vocab_path):
    teacher = tmp_path / "classifier"
    model = create_model(BertConfig.from_variant("tiny"), "classification", 2, seed=0)
    checkpoints.save_pretrained(model, BertTokenizer(vocab_path), teacher, "bert_mini")
    config = _pd_config(tmp_path / "run", tfds_dir, inits, f",teacher={teacher}")
    with pytest.raises(pipeline.PipelineError, match="has no span .start/end. head"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_squad_configs_document_their_command_and_runlocal_is_small():
    for module in (finetune_squad, pd_squad):
        assert "python -m bert_mini.main --config=configs/" in module.__doc__
    config = pd_squad.get_config("runlocal")
    assert config.pipeline.task == "squad" and config.pipeline.max_seq_length == SEQ
    for section in TASK_STAGES:
        stage = config[section]
        assert stage.model.head == "span" and stage.train.num_train_steps <= 100
        assert (stage.data.max_seq_length, stage.data.doc_stride) == (SEQ, 64)
        assert (stage.data.train_split, stage.data.eval_split) == (
            "validation[:50%]",
            "validation[50%:]",
        )
    full = pd_squad.get_config()
    assert full.stage_distill.data.train_split == "train"
    assert full.stage_distill.data.max_seq_length == 384
    with pytest.raises(ValueError, match="configs/pd_squad.py: task='sst2'; this config is for"):
        pd_squad.get_config("task=sst2")
