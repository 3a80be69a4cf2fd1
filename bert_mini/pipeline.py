"""Pre-trained Distillation end to end, as one resumable command (``configs/pd_*.py``).

Turc et al. (2019): pre-train a compact student with masked LM, then distil a fine-tuned large
teacher into it on unlabeled transfer text D_T, optionally fine-tune on the labeled task data D_L.
Stages, each in its own folder with a ``manifest.json`` written when (and only when) it finished:

1. ``student``  pre-train the student (MLM on D_LM), or take ``pipeline.student_init``;
2. ``teacher``  fine-tune ``pipeline.teacher_init`` on D_L, or take the fine-tuned
   ``pipeline.teacher`` as is, and measure its dev metrics;
3. ``teacher_logits``  the teacher's logits over D_T, once, as sharded files;
4. ``distill``  the student against the cached teacher distribution on D_T;
5. ``finetune`` the student (or distilled student) on D_L;
6. ``evaluate`` dev metrics of the final model and test predictions in GLUE's submission format;
   SQuAD (task ``squad``, span head; ``configs/pd_squad.py``): EM/F1 and ``dev_predictions.json``,
   with the teacher's start/end logits cached as one ``[2*S]`` row per window;
7. ``results.json`` and ``report.md`` in the workdir.

``pipeline.method`` picks the stages: ``pd`` (1-4), ``pdf`` (1-5), ``pf`` (1, 5), ``d`` (2-4 with
a random student), ``scratch`` (5 from a random init). A stage whose manifest exists is skipped,
so rerunning the command after a crash continues where it stopped; training stages resume from
their own Orbax checkpoints. A manifest made with another stage config is an error, never silently
reused. The student-pretraining, teacher and logits stages live in ``pipeline.shared_dir``
(default: the workdir), so a sweep's runs share them.

Checks that need no training run first: the method, the teacher's label count against the task,
the student checkpoint's vocabulary against the teacher's, and a non-empty D_T.
"""

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bert_mini import checkpoints, downloads, inputs, metrics, squad_inputs, train
from bert_mini import teacher_logits as logits_cache
from bert_mini.data import glue
from bert_mini.model import count_params
from bert_mini.tokenization import BertTokenizer

_log = logging.getLogger("bert_mini")

METHOD_STAGES: dict[str, tuple[str, ...]] = {
    "pd": ("student", "teacher", "teacher_logits", "distill", "evaluate"),
    "pdf": ("student", "teacher", "teacher_logits", "distill", "finetune", "evaluate"),
    "pf": ("student", "finetune", "evaluate"),
    "d": ("teacher", "teacher_logits", "distill", "evaluate"),
    "scratch": ("finetune", "evaluate"),
}
MANIFEST = "manifest.json"
# GLUE's submission file per task (https://gluebenchmark.com/submit).
SUBMISSION_FILES = {
    "cola": "CoLA.tsv",
    "sst2": "SST-2.tsv",
    "mrpc": "MRPC.tsv",
    "stsb": "STS-B.tsv",
    "qqp": "QQP.tsv",
    "mnli": "MNLI-m.tsv",
    "mnli_matched": "MNLI-m.tsv",
    "mnli_mismatched": "MNLI-mm.tsv",
    "qnli": "QNLI.tsv",
    "rte": "RTE.tsv",
    "wnli": "WNLI.tsv",
}


# GLUE's submission files hold label names for the NLI tasks and label indices elsewhere.
NAMED_LABELS = {"mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "ax"}


class PipelineError(ValueError):
    """A pipeline input that cannot work (caught before any training)."""


# ----------------------------------------------------------------------------- stage plumbing


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    """Written to a temporary name and renamed: a manifest is either whole or absent."""
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"bert_mini.pipeline.{name}")


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first setting that differs, as ``key: old -> new``; None when they agree.

    A key the old settings lack is a field added to the configs since that stage ran (its
    default keeps the old behaviour), so it does not count; a removed or changed key does.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old):
            found = _first_difference(old[key], new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def run_stage(
    name: str, stage_dir: pathlib.Path, settings: dict[str, Any], work: Callable[[], dict]
) -> dict[str, Any]:
    """Runs ``work()`` unless ``stage_dir`` already holds a finished manifest of these settings.

    ``work`` returns the stage's outputs (paths, metrics); the manifest records them with the
    settings and the wall time, and is written last.
    """
    settings = _jsonable(settings)
    manifest_path = stage_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        difference = _first_difference(manifest["settings"], settings)
        if difference:
            raise PipelineError(
                f"{manifest_path}: stage {name!r} was made with other settings ({difference}); "
                "use another workdir/shared_dir or delete that stage folder"
            )
        _log.info("stage %s: done before, reusing %s", name, stage_dir)
        return {**manifest, "dir": str(stage_dir), "status": "reused"}
    _log.info("stage %s: starting in %s", name, stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    outputs = work()
    manifest = {
        "stage": name,
        "dir": str(stage_dir),
        "settings": settings,
        "outputs": _jsonable(outputs),
        "wall_time_s": round(time.time() - started, 1),
    }
    _barrier(f"{name}.done")
    _write_json(manifest_path, manifest)
    return {**manifest, "status": "done"}


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What the task needs from a model: its head and label count."""

    name: str
    head: str
    num_labels: int
    label_names: tuple[str, ...] | None


def task_info(task: str) -> TaskInfo:
    if task == squad_inputs.TASK:  # start/end logits over positions; no label set
        return TaskInfo(task, "span", 2, None)
    spec = glue.glue_task(task)
    if spec.is_regression:
        return TaskInfo(spec.name, "regression", 1, None)
    return TaskInfo(spec.name, "classification", len(spec.label_names), spec.label_names)


def _stage_config(
    config: ConfigDict, section: str, stage_dir: pathlib.Path, **fields: Any
) -> ConfigDict:
    """A copy of ``config.<section>`` (a full run config) with the pipeline's wiring applied.

    ``fields`` are dotted keys, e.g. ``{"model.init_checkpoint": path}``.
    """
    stage = ConfigDict(config[section].to_dict())
    stage.seed = config.seed
    stage.workdir = str(stage_dir)
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = stage
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return stage


def _task_fields(config: ConfigDict, task: TaskInfo) -> dict[str, Any]:
    return {
        "data.task": task.name,
        "data.data_dir": config.pipeline.data_dir,
        "data.tfds_dir": config.pipeline.tfds_dir,
        "model.head": task.head,
        "model.num_labels": task.num_labels,
    }


# ----------------------------------------------------------------------------- checks


def _vocab(checkpoint: str | os.PathLike) -> list[str]:
    tokenizer = BertTokenizer.from_pretrained(checkpoint)
    return [token for token, _ in sorted(tokenizer.vocab.items(), key=lambda item: item[1])]


def _default_vocab(config: ConfigDict) -> pathlib.Path:
    root = pathlib.Path(config.pipeline.data_dir) if config.pipeline.data_dir else None
    from bert_mini.paths import shared_data_dir

    return (root or shared_data_dir()) / "vocab" / "bert-base-uncased-vocab.txt"


def check_teacher_labels(checkpoint: str | os.PathLike, task: TaskInfo) -> None:
    """A fine-tuned teacher must predict exactly the task's labels (count and kind)."""
    source = checkpoints.read_checkpoint(pathlib.Path(checkpoint))
    if task.head == "span":  # SQuAD: a start/end head, no classifier
        if "span" not in source.groups_present():
            raise PipelineError(
                f"pipeline.teacher {checkpoint}: has no span (start/end) head, so it is not "
                f"fine-tuned on {task.name}; pass it as pipeline.teacher_init to fine-tune it first"
            )
        return
    found = checkpoints.classifier_labels(source)
    if found is None:
        raise PipelineError(
            f"pipeline.teacher {checkpoint}: has no classifier head, so it is not fine-tuned on "
            f"{task.name}; pass it as pipeline.teacher_init to fine-tune it first"
        )
    if found != task.num_labels or (source.head_hint and source.head_hint != task.head):
        kind = source.head_hint or ("regression" if found == 1 else "classification")
        raise PipelineError(
            f"pipeline.teacher {checkpoint}: its head predicts {found} label(s) ({kind}), but "
            f"{task.name} has {task.num_labels} ({task.head}"
            + (f": {', '.join(task.label_names)})" if task.label_names else ")")
        )


def check_same_vocab(student: str | os.PathLike, reference: str | os.PathLike) -> None:
    """Student and teacher share one WordPiece vocabulary in the paper; a different one almost
    always means a wrong checkpoint (cased vs uncased, another language)."""
    student_vocab, reference_vocab = _vocab(student), _vocab(reference)
    if student_vocab != reference_vocab:
        first = next(
            (
                i
                for i, (a, b) in enumerate(zip(student_vocab, reference_vocab, strict=False))
                if a != b
            ),
            min(len(student_vocab), len(reference_vocab)),
        )
        raise PipelineError(
            f"pipeline.student_init {student}: its vocabulary ({len(student_vocab)} tokens) is "
            f"not the teacher's {reference} ({len(reference_vocab)} tokens; first difference at "
            f"id {first})"
        )


def check_method(method: str) -> tuple[str, ...]:
    if method not in METHOD_STAGES:
        raise PipelineError(
            f"pipeline.method: unknown {method!r}; choose one of {list(METHOD_STAGES)}"
        )
    return METHOD_STAGES[method]


# ----------------------------------------------------------------------------- inference


def _length_buckets(lengths_N: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Example indices in batches of similar length, so little compute goes to padding."""
    order = np.argsort(lengths_N, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_predictor(
    model: Any, batch_size: int, multiple: int = 16
) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function from tokenised arrays to the model's ``[N, C]`` head logits, in their order.

    Batches are bucketed by length and cut to the longest row (rounded up to ``multiple``, so few
    shapes are compiled, once per predictor); the last batch is padded to ``batch_size`` rows.
    """
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids_BxS, types_BxS, mask_BxS):
        output = nnx.merge(graphdef, params)(ids_BxS, types_BxS, mask_BxS, deterministic=True)
        return output.logits.astype(jnp.float32)

    def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
        lengths_N = arrays["attention_mask"].sum(axis=1)
        out: np.ndarray | None = None
        for rows in _length_buckets(lengths_N, batch_size):
            width = int(-(-max(int(lengths_N[rows].max()), 1) // multiple) * multiple)
            width = min(width, arrays["input_ids"].shape[1])
            padded = np.pad(rows, (0, batch_size - len(rows)), mode="edge")
            keys = ("input_ids", "token_type_ids", "attention_mask")
            logits_BxC = forward(params, *(arrays[key][padded, :width] for key in keys))
            logits_BxC = np.asarray(logits_BxC)[: len(rows)]
            if out is None:
                out = np.zeros((len(lengths_N), logits_BxC.shape[-1]), np.float32)
            out[rows] = logits_BxC
        return np.zeros((0, 1), np.float32) if out is None else out

    return predict


def predict_logits(model: Any, arrays: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """``make_predictor(model, batch_size)(arrays)``: one pass, compiled for this call only."""
    return make_predictor(model, batch_size)(arrays)


def _load_classifier(checkpoint: str | os.PathLike, task: TaskInfo, dtype: str = "float32"):
    model, tokenizer = checkpoints.from_pretrained(
        checkpoint, head=task.head, num_labels=task.num_labels, drop_heads=True, dtype=dtype
    )
    return model, tokenizer


def _glue_arrays(config: ConfigDict, tokenizer: BertTokenizer, split: str, max_length: int):
    stage = ConfigDict(
        {
            "data": {
                "task": config.pipeline.task,
                "data_dir": config.pipeline.data_dir,
                "tfds_dir": config.pipeline.tfds_dir,
                "max_seq_length": max_length,
            }
        }
    )
    return inputs.glue_arrays(stage, tokenizer, split)


def dev_metrics(config: ConfigDict, checkpoint: str | os.PathLike, task: TaskInfo) -> dict:
    """The task's dev metrics of a fine-tuned checkpoint (the teacher's, the final student's)."""
    model, tokenizer = _load_classifier(checkpoint, task)
    if task.head == "span":  # SQuAD EM/F1 (fractions) of the decoded answer texts
        batch_size = config.pipeline.predict_batch_size
        return squad_inputs.dev_predictions(config, model, tokenizer, batch_size).metrics
    arrays = _glue_arrays(config, tokenizer, "validation", config.pipeline.max_seq_length)
    logits_NxC = predict_logits(model, arrays, config.pipeline.predict_batch_size)
    return metrics.glue_metrics(task.name, logits_NxC, arrays["label"])


def write_test_predictions(
    config: ConfigDict, checkpoint: str | os.PathLike, task: TaskInfo, out_dir: pathlib.Path
) -> pathlib.Path:
    """GLUE's submission file (``index\\tprediction``) for the task's test split."""
    model, tokenizer = _load_classifier(checkpoint, task)
    arrays = _glue_arrays(config, tokenizer, "test", config.pipeline.max_seq_length)
    logits_NxC = predict_logits(model, arrays, config.pipeline.predict_batch_size)
    order = np.argsort(arrays["idx"], kind="stable")
    lines = ["index\tprediction"]
    for row in order:
        if task.label_names is None:
            prediction = f"{float(np.clip(logits_NxC[row, 0], 0.0, 5.0)):.3f}"
        else:
            label = int(np.argmax(logits_NxC[row]))
            prediction = task.label_names[label] if task.name in NAMED_LABELS else str(label)
        lines.append(f"{int(arrays['idx'][row])}\t{prediction}")
    path = out_dir / SUBMISSION_FILES.get(task.name, f"{task.name}.tsv")
    if jax.process_index() == 0:
        path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class Plan:
    """Where each stage lives and what the pipeline is asked to do."""

    config: ConfigDict
    workdir: pathlib.Path
    shared: pathlib.Path
    task: TaskInfo
    stages: tuple[str, ...]

    @property
    def student_dir(self) -> pathlib.Path:
        return self.shared / f"student_{self.config.pipeline.student}"


def _train(stage: ConfigDict, stage_dir: pathlib.Path, export: str = "best") -> dict[str, Any]:
    """Runs a training stage; its output is the ``best/`` dev model, or ``final/`` (pre-training:
    the paper keeps the last pre-trained model)."""
    results = train.train_and_evaluate(stage, stage_dir)
    return {
        "checkpoint": str(stage_dir / export),
        "metrics": results["best"],
        "final_metrics": results["final"],
        "steps": results["steps"],
    }


def student_stage(plan: Plan) -> dict[str, Any]:
    config = plan.config
    init = config.pipeline.student_init
    stage_dir = plan.student_dir
    if init:
        settings = {"student_init": str(init)}
        return run_stage("student", stage_dir, settings, lambda: {"checkpoint": str(init)})
    stage = _stage_config(
        config,
        "stage_pretrain",
        stage_dir,
        **{"model.variant": config.pipeline.student, "data.data_dir": config.pipeline.data_dir},
    )
    return run_stage(
        "student", stage_dir, stage.to_dict(), lambda: _train(stage, stage_dir, "final")
    )


def teacher_stage(plan: Plan) -> dict[str, Any]:
    config = plan.config
    stage_dir = plan.shared / "teacher"
    if config.pipeline.teacher:
        checkpoint = config.pipeline.teacher

        def measure() -> dict[str, Any]:
            return {
                "checkpoint": str(checkpoint),
                "metrics": dev_metrics(config, checkpoint, plan.task),
            }

        return run_stage("teacher", stage_dir, {"teacher": str(checkpoint)}, measure)
    stage = _stage_config(
        config,
        "stage_teacher",
        stage_dir,
        **_task_fields(config, plan.task),
        **{"model.init_checkpoint": config.pipeline.teacher_init},
    )
    return run_stage("teacher", stage_dir, stage.to_dict(), lambda: _train(stage, stage_dir))


def _distill_data_config(plan: Plan) -> ConfigDict:
    stage_dir = plan.workdir / "distill"
    return _stage_config(
        plan.config, "stage_distill", stage_dir, **_task_fields(plan.config, plan.task)
    )


def _cache_logits(
    stage_dir: pathlib.Path,
    predict: Callable[[dict[str, np.ndarray]], np.ndarray],
    arrays: dict[str, np.ndarray],
    settings: dict[str, Any],
    top_k: int = 0,
) -> dict[str, Any]:
    """The teacher's logits over every row of ``arrays``, written shard by shard (resumable)."""
    num_rows = len(arrays["input_ids"])

    def logits_of(start: int, stop: int) -> np.ndarray:
        return predict({key: value[start:stop] for key, value in arrays.items()})

    manifest = logits_cache.write_cache(
        stage_dir / "cache",
        num_rows,
        logits_of,
        shard_size=settings["shard_size"],
        top_k=top_k,
        fingerprint_value=logits_cache.fingerprint(settings),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=lambda: _barrier("teacher_logits"),
        log=_log.info,
    )
    return {"cache": str(stage_dir / "cache"), **manifest}


def logits_stage(plan: Plan, teacher: dict[str, Any]) -> dict[str, Any]:
    if plan.task.head == "span":
        return _span_logits_stage(plan, teacher)
    config = plan.config
    stage_dir = plan.shared / "teacher_logits"
    data_config = _distill_data_config(plan)
    examples = inputs.transfer_examples(data_config)
    teacher_checkpoint = teacher["outputs"]["checkpoint"]
    top_k = (
        config.pipeline.logits_top_k
        if 0 < config.pipeline.logits_top_k < plan.task.num_labels
        else 0
    )
    settings = {
        "teacher": teacher_checkpoint,
        "teacher_settings": teacher["settings"],
        "transfer": data_config.data.transfer,
        "max_examples": data_config.data.max_examples,
        "max_seq_length": data_config.data.max_seq_length,
        "num_examples": len(examples),
        "texts": logits_cache.fingerprint([(e.text, e.text_b) for e in examples]),
        "top_k": top_k,
        "shard_size": config.pipeline.logits_shard_size,
        "teacher_dtype": data_config.distill.teacher_dtype,
    }

    def compute() -> dict[str, Any]:
        model, tokenizer = _load_classifier(
            teacher_checkpoint, plan.task, dtype=data_config.distill.teacher_dtype
        )
        arrays = inputs.transfer_arrays(data_config, tokenizer, examples)
        predict = make_predictor(model, config.pipeline.predict_batch_size)

        return _cache_logits(stage_dir, predict, arrays, settings, top_k)

    return run_stage("teacher_logits", stage_dir, settings, compute)


def _span_logits_stage(plan: Plan, teacher: dict[str, Any]) -> dict[str, Any]:
    """SQuAD: the teacher's start/end logits over D_T's windows, one ``[2*S]`` row per window
    (start then end; positions outside the attention mask hold ``MISSING_LOGIT``)."""
    config = plan.config
    stage_dir = plan.shared / "teacher_logits"
    data_config = _distill_data_config(plan)
    teacher_checkpoint = teacher["outputs"]["checkpoint"]
    tokenizer = BertTokenizer.from_pretrained(teacher_checkpoint)
    features, examples = squad_inputs.transfer_windows(data_config, tokenizer)
    settings = {
        "teacher": teacher_checkpoint,
        "teacher_settings": teacher["settings"],
        **squad_inputs.transfer_settings(data_config, examples, len(features)),
        "shard_size": config.pipeline.logits_shard_size,
        "teacher_dtype": data_config.distill.teacher_dtype,
    }

    def compute() -> dict[str, Any]:
        dtype = data_config.distill.teacher_dtype
        model, _ = _load_classifier(teacher_checkpoint, plan.task, dtype=dtype)
        arrays = features.arrays()
        predict = squad_inputs.make_span_predictor(model, config.pipeline.predict_batch_size)

        return _cache_logits(stage_dir, predict, arrays, settings)

    return run_stage("teacher_logits", stage_dir, settings, compute)


def distill_stage(plan: Plan, student: dict | None, logits: dict[str, Any]) -> dict[str, Any]:
    stage_dir = plan.workdir / "distill"
    fields = {
        **_task_fields(plan.config, plan.task),
        "model.init_checkpoint": student["outputs"]["checkpoint"] if student else "",
        "model.variant": plan.config.pipeline.student,
        "distill.teacher_logits": logits["outputs"]["cache"],
        "distill.teacher_checkpoint": "",
    }
    stage = _stage_config(plan.config, "stage_distill", stage_dir, **fields)
    return run_stage("distill", stage_dir, stage.to_dict(), lambda: _train(stage, stage_dir))


def finetune_stage(plan: Plan, init: dict | None) -> dict[str, Any]:
    stage_dir = plan.workdir / "finetune"
    fields = {
        **_task_fields(plan.config, plan.task),
        "model.init_checkpoint": init["outputs"]["checkpoint"] if init else "",
        "model.variant": plan.config.pipeline.student,
    }
    stage = _stage_config(plan.config, "stage_finetune", stage_dir, **fields)
    return run_stage("finetune", stage_dir, stage.to_dict(), lambda: _train(stage, stage_dir))


def evaluate_stage(plan: Plan, final: dict[str, Any]) -> dict[str, Any]:
    config = plan.config
    stage_dir = plan.workdir / "evaluate"
    checkpoint = final["outputs"]["checkpoint"]

    def work() -> dict[str, Any]:
        if plan.task.head == "span":
            return _span_evaluation(config, checkpoint, plan.task, stage_dir)
        outputs: dict[str, Any] = {
            "checkpoint": checkpoint,
            "metrics": dev_metrics(config, checkpoint, plan.task),
        }
        model, _ = _load_classifier(checkpoint, plan.task)
        outputs["params"] = count_params(model)
        if config.pipeline.predict_test:
            outputs["test_predictions"] = str(
                write_test_predictions(config, checkpoint, plan.task, stage_dir)
            )
        return outputs

    settings = {"checkpoint": checkpoint, "trained": final["settings"]}
    return run_stage("evaluate", stage_dir, settings, work)


def _span_evaluation(
    config: ConfigDict, checkpoint: str, task: TaskInfo, stage_dir: pathlib.Path
) -> dict[str, Any]:
    """SQuAD has no public test set: EM/F1 on the eval split and its answers as
    ``dev_predictions.json`` ({id: answer}, the official evaluate-v1.1.py input)."""
    model, tokenizer = _load_classifier(checkpoint, task)
    dev = squad_inputs.dev_predictions(config, model, tokenizer, config.pipeline.predict_batch_size)
    outputs = {"checkpoint": checkpoint, "metrics": dev.metrics, "params": count_params(model)}
    if config.pipeline.predict_test:
        path = stage_dir / "dev_predictions.json"
        if jax.process_index() == 0:
            squad_inputs.write_predictions(dev.predictions, path)
        outputs["dev_predictions"] = str(path)
    return outputs


# ----------------------------------------------------------------------------- entry point


def _resolve(key: str, name_or_path: str) -> pathlib.Path:
    """A local folder for a checkpoint path or a Google release name (downloaded once)."""
    try:
        return downloads.resolve_checkpoint(name_or_path)
    except FileNotFoundError as e:
        raise PipelineError(f"pipeline.{key}: {e}") from None


def preflight(config: ConfigDict) -> Plan:
    """Every check that needs no training, so bad input fails in seconds, not after hours."""
    stages = check_method(config.pipeline.method)
    task = task_info(config.pipeline.task)
    workdir = pathlib.Path(config.workdir)
    shared = pathlib.Path(config.pipeline.shared_dir) if config.pipeline.shared_dir else workdir
    plan = Plan(config, workdir, shared, task, stages)
    uses_teacher = "teacher" in stages
    needed = [("student_init", "student" in stages), ("teacher", uses_teacher)]
    needed.append(("teacher_init", uses_teacher and not config.pipeline.teacher))
    for key, used in needed:
        if used and config.pipeline[key]:
            config.pipeline[key] = str(_resolve(key, config.pipeline[key]))
    if uses_teacher and config.pipeline.teacher:
        check_teacher_labels(config.pipeline.teacher, task)
    elif uses_teacher and not config.pipeline.teacher_init:
        raise PipelineError(
            f"method {config.pipeline.method!r} needs pipeline.teacher (fine-tuned) or "
            "pipeline.teacher_init (to fine-tune)"
        )
    if "student" in stages and config.pipeline.student_init:
        reference = (
            config.pipeline.teacher or config.pipeline.teacher_init
            if uses_teacher
            else _default_vocab(config)
        )
        check_same_vocab(config.pipeline.student_init, reference)
    if task.head == "span":  # SQuAD: a missing train-v1.1.json fails here
        for section in ("stage_teacher", "stage_distill", "stage_finetune"):
            fields = _task_fields(config, task)
            squad_inputs.check_splits(_stage_config(config, section, workdir, **fields))
    elif "teacher_logits" in stages:
        inputs.transfer_examples(_distill_data_config(plan))  # an empty D_T fails here
    return plan


def run_pipeline(config: ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or continues) every stage of ``config.pipeline.method``; returns the results."""
    started = time.time()
    with config.unlocked():
        config.workdir = str(workdir)
    plan = preflight(config)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if "student" in plan.stages:
        done["student"] = student_stage(plan)
    if "teacher" in plan.stages:
        done["teacher"] = teacher_stage(plan)
        done["teacher_logits"] = logits_stage(plan, done["teacher"])
        done["distill"] = distill_stage(plan, done.get("student"), done["teacher_logits"])
    if "finetune" in plan.stages:
        done["finetune"] = finetune_stage(plan, done.get("distill", done.get("student")))
    last = done["finetune"] if "finetune" in done else done["distill"]
    done["evaluate"] = evaluate_stage(plan, last)
    results = build_results(plan, done, time.time() - started)
    _write_json(plan.workdir / "results.json", results)
    if jax.process_index() == 0:
        (plan.workdir / "report.md").write_text(report_markdown(results))
        _log.info("results: %s", plan.workdir / "results.json")
        print(report_markdown(results))
    return results


def build_results(plan: Plan, done: dict[str, dict], wall_time_s: float) -> dict[str, Any]:
    """The run's summary, the shape ``bert_mini.report`` reads for sweeps."""
    config = plan.config
    main_metric = "f1" if plan.task.head == "span" else metrics.GLUE_MAIN_METRIC[plan.task.name]
    student = config.pipeline.student
    evaluation = done["evaluate"]["outputs"]
    teacher = None
    if "teacher" in done:
        teacher = {
            "checkpoint": done["teacher"]["outputs"]["checkpoint"],
            "dev": done["teacher"]["outputs"]["metrics"],
        }
    layers, hidden = (int(part.split("-")[1]) for part in student.split("_")[:2])
    return {
        "task": plan.task.name,
        "method": config.pipeline.method,
        "student": student,
        "student_layers": layers,
        "student_hidden": hidden,
        "student_params": evaluation["params"],
        "main_metric": main_metric,
        "dev": evaluation["metrics"],
        "teacher": teacher,
        "test_predictions": evaluation.get("test_predictions"),
        "dev_predictions": evaluation.get("dev_predictions"),  # SQuAD: {id: answer} JSON
        "stages": {
            name: {
                "status": stage["status"],
                "dir": str(stage.get("dir", "")),
                "wall_time_s": stage["wall_time_s"],
                "metrics": stage["outputs"].get("metrics", {}),
                "steps": stage["outputs"].get("steps"),
            }
            for name, stage in done.items()
        },
        "wall_time_s": round(wall_time_s, 1),
        "config": config.to_dict(),
    }


def report_markdown(results: dict[str, Any]) -> str:
    """One table: every stage's status, steps, wall time and its dev metric."""
    main = results["main_metric"]
    lines = [
        f"# {results['method']} on {results['task']}: student {results['student']} "
        f"({results['student_params'] / 1e6:.1f}M parameters)",
        "",
        f"Dev {main}: **{100 * results['dev'][main]:.2f}**"
        + (f" (teacher {100 * results['teacher']['dev'][main]:.2f})" if results["teacher"] else ""),
        "",
        f"| stage | status | steps | wall time (s) | dev {main} |",
        "|---|---|---|---|---|",
    ]
    for name, stage in results["stages"].items():
        value = stage["metrics"].get(main)
        shown = "" if value is None else f"{100 * value:.2f}"
        steps = "" if stage["steps"] is None else str(stage["steps"])
        lines.append(f"| {name} | {stage['status']} | {steps} | {stage['wall_time_s']} | {shown} |")
    lines.append("")
    lines.append(f"Total wall time this run: {results['wall_time_s']} s")
    return "\n".join(lines) + "\n"
