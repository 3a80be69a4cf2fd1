"""The training loop: init or restore, jit with shardings, log, evaluate, checkpoint.

Start order: a checkpoint in the workdir (exact resume) -> ``config.model.init_checkpoint`` (any
format ``checkpoints.read_checkpoint`` reads) -> random init, straight into the sharded layout.
Every step is one jitted call with the state donated; metrics stay on device as (sum, count)
pairs and are fetched only at log, evaluation and checkpoint steps, after the next step has been
dispatched. A NaN or Inf loss stops the run before anything is saved, so the last checkpoint
stays the last good one.

Outputs in the workdir: ``checkpoints/`` (Orbax), ``metrics.jsonl``, TensorBoard events in
``tensorboard/``, ``best/`` (the best dev model, loadable by ``bert_mini.from_pretrained``),
``final/`` (the model after the last step), ``results.json`` (final and best dev metrics,
timings, the config) and ``compile_cache/`` (compiled steps for a restart; ``compile_cache.py``).
"""

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from bert_mini import checkpoints, compile_cache, downloads, inputs, metrics, optim, sharding, steps
from bert_mini import teacher_logits as logits_cache
from bert_mini.data.pipeline import HostShard, StreamPosition
from bert_mini.model import HEAD_CHOICES, BertConfig, BertModel, create_model
from bert_mini.paths import shared_data_dir
from bert_mini.tokenization import BertTokenizer
from bert_mini.train_checkpoints import TrainCheckpoints, check_model_record

_log = logging.getLogger("bert_mini")

TASK_KIND = {"classification": "classification", "regression": "regression", "span": "span"}


@dataclasses.dataclass
class ModelSpec:
    """What to build: config, head and labels, and where the initial weights come from."""

    config: BertConfig
    head: str | None
    num_labels: int
    tokenizer: BertTokenizer
    source: checkpoints.SourceCheckpoint | None

    def record(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "head": self.head, "num_labels": self.num_labels}

    def make(self, seed: int) -> BertModel:
        return create_model(self.config, self.head, self.num_labels, seed)


def _head(config: ConfigDict) -> str | None:
    head = config.model.head
    head = None if head in ("", "none", "None") else head
    if head not in HEAD_CHOICES:
        raise ValueError(
            f"config.model.head: unknown head {head!r}; choose one of {list(HEAD_CHOICES)}"
        )
    return head


def model_spec(config: ConfigDict) -> ModelSpec:
    """Model config from the init checkpoint when there is one, else from the size table."""
    head = _head(config)
    dtypes = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    source = None
    if config.model.init_checkpoint:
        path = downloads.resolve_if_release(config.model.init_checkpoint)  # names: downloaded
        if not path.exists():
            raise FileNotFoundError(f"config.model.init_checkpoint not found: {path}")
        source = checkpoints.read_checkpoint(path)
        bert_config = dataclasses.replace(source.config, **dtypes)
        vocab_dir = path if path.is_dir() else path.parent
    else:
        bert_config = BertConfig.from_variant(config.model.variant, **dtypes)
        vocab_dir = shared_data_dir() / "vocab" / "bert-base-uncased-vocab.txt"
    vocab = pathlib.Path(config.model.vocab_path) if config.model.vocab_path else vocab_dir
    tokenizer = BertTokenizer.from_pretrained(vocab)
    num_labels = 1 if head == "regression" else config.model.num_labels
    return ModelSpec(bert_config, head, num_labels, tokenizer, source)


def _initial_params(spec: ModelSpec, config: ConfigDict, mesh, rules) -> tuple[Any, Any]:
    """(graphdef, sharded params) from the init checkpoint, or a sharded random init."""
    if spec.source is None:
        return sharding.init_sharded(lambda: spec.make(config.seed), mesh, rules)
    model, report = checkpoints.build_model(
        spec.source,
        spec.head,
        spec.num_labels,
        new_head=True,
        drop_heads=True,
        dtype=spec.config.dtype,
        param_dtype=spec.config.param_dtype,
        seed=config.seed,
    )
    report.log()
    graphdef, params = nnx.split(model)
    return graphdef, sharding.shard_params(params, mesh, rules)


def _task_kind(head: str | None, mode: str) -> str:
    if mode == "pretrain":
        return "pretrain"
    if head not in TASK_KIND:
        raise ValueError(f"config.model.head must be classification, regression or span for {mode}")
    return TASK_KIND[head]


# ----------------------------------------------------------------------------- logging


class Writers:
    """metrics.jsonl + TensorBoard, on process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        import tensorflow as tf

        self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tensorboard = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        import tensorflow as tf

        self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.jsonl.flush()
        with self.tensorboard.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"{split}/{name}", value)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def _means(sums: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    fetched = jax.device_get(sums)
    return {
        name: float(total) / max(float(count), 1e-9) for name, (total, count) in fetched.items()
    }


def _add(total: dict | None, new: dict) -> dict:
    return new if total is None else jax.tree.map(jnp.add, total, new)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    eval_fn,
    params,
    eval_batches: Iterator[dict[str, np.ndarray]],
    mesh,
    kind: str,
    task: str,
    score_spans: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Dev metrics over every example exactly once (padding rows carry ``eval_mask`` = 0).

    Span tasks: ``score_spans`` turns every eval window's start/end logits (in order) into
    answer texts and EM/F1 (``Inputs.score_spans``, from ``bert_mini.squad_inputs``).
    """
    sums = None
    predictions, labels = [], []
    starts, ends = [], []  # span tasks
    for local in eval_batches:
        batch = sharding.global_batch(local, mesh)
        outputs, batch_sums = eval_fn(params, batch)
        sums = _add(sums, batch_sums)
        if kind in ("classification", "regression"):  # global arrays, gathered on every host
            logits, label, mask = multihost_utils.process_allgather(
                (outputs["logits"], batch["label"], batch["eval_mask"]), tiled=True
            )
            predictions.append(logits[mask == 1])
            labels.append(label[mask == 1])
        elif kind == "span" and score_spans is not None:
            start, end, mask = multihost_utils.process_allgather(
                (outputs["start_logits"], outputs["end_logits"], batch["eval_mask"]), tiled=True
            )
            starts.append(start[mask == 1])
            ends.append(end[mask == 1])
    results = {f"{name}": value for name, value in _means(sums or {}).items()}
    if predictions:
        results.update(
            metrics.glue_metrics(task, np.concatenate(predictions), np.concatenate(labels))
        )
    if starts:
        results.update(score_spans(np.concatenate(starts), np.concatenate(ends)))
    return results


def _main_metric(config: ConfigDict, kind: str) -> str:
    if config.eval.best_metric:
        return config.eval.best_metric
    if kind == "pretrain":
        return "mlm_accuracy"
    if kind == "span":  # SQuAD: F1 (a fraction, as GLUE metrics), as BERT's tables report
        return "f1"
    return metrics.GLUE_MAIN_METRIC[config.data.task]


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Runs ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns results.

    Compiled steps go to the persistent cache that ``config.compile_cache_dir`` names, so a
    restart loads them instead of compiling again.
    """
    workdir = pathlib.Path(workdir)
    with compile_cache.persistent_cache(compile_cache.cache_dir(config.compile_cache_dir, workdir)):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    started = time.time()
    mesh = sharding.make_mesh(
        {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    )
    rules = sharding.rules_from_config(config.mesh.rules)
    sharding.check_batch_divisible(config.train.global_batch_size, mesh)
    sharding.check_batch_divisible(config.eval.global_batch_size, mesh)
    spec = model_spec(config)
    kind = _task_kind(spec.head, config.mode)
    check_model_record(workdir, spec.record())
    ckpts = TrainCheckpoints(
        workdir / "checkpoints",
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    total_steps = config.train.num_train_steps
    warmup_steps = int(config.train.warmup_proportion * total_steps)
    resuming = ckpts.latest_step() is not None
    if resuming:  # a random init only gives the layout to restore into
        graphdef, params = sharding.init_sharded(lambda: spec.make(config.seed), mesh, rules)
    else:
        graphdef, params = _initial_params(spec, config, mesh, rules)
    optimizer = optim.make_optimizer(
        learning_rate=config.train.learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        optimizer=config.train.optimizer,
        weight_decay=config.train.weight_decay,
        clip_norm=config.train.clip_norm or None,
        grad_accum_steps=config.train.grad_accum_steps,
        frozen=tuple(config.train.frozen),
        params=params,
    )
    learning_rate = optim.learning_rate_schedule(
        config.train.learning_rate, warmup_steps, total_steps
    )
    state = jax.jit(
        functools.partial(steps.create_train_state, optimizer=optimizer, seed=config.seed)
    )(params)
    position = None
    if resuming:
        state, data = ckpts.restore(state)
        position = StreamPosition.from_dict(data)
        _log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))

    teacher_params, teacher_graphdef, teacher_logits = None, None, None
    if config.mode == "distill":
        teacher_graphdef, teacher_params, teacher_logits = _teacher(config, spec, mesh, rules)
    data = inputs.make_inputs(
        config, spec.tokenizer, HostShard.current(), position, teacher_logits=teacher_logits
    )

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    mode_static: dict[str, Any] = {"graphdef": graphdef, "optimizer": optimizer}
    if config.mode == "distill":
        mode_static.update(
            teacher_graphdef=teacher_graphdef,
            temperature=config.distill.temperature,
            hard_label_weight=config.distill.hard_label_weight,
        )
    train_fn = steps.step_function(kind, config.mode, **mode_static)
    if config.mode == "distill":
        train_step = jax.jit(
            lambda s, b: train_fn(s, b, teacher_params),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
    else:
        train_step = jax.jit(train_fn, out_shardings=(state_shardings, None), donate_argnums=0)
    eval_fn = jax.jit(steps.step_function(kind, "eval", graphdef=graphdef))

    def dev_metrics(params) -> dict[str, float]:
        return evaluate(
            eval_fn, params, data.eval_batches(), mesh, kind, config.data.task, data.score_spans
        )

    writers = Writers(workdir)
    best_name = _main_metric(config, kind)
    best: dict[str, Any] = _read_json(workdir / "best.json")
    last_eval: dict[str, float] = {}
    step = int(state.step)
    sums, last_saved = None, step
    window_start, window_examples, window_tokens = time.time(), 0, 0
    window_first_step = step
    try:
        while step < total_steps:
            local = next(data.train)
            batch = sharding.global_batch(local, mesh)
            state, step_sums = train_step(state, batch)
            sums = _add(sums, step_sums)
            step += 1
            window_examples += config.train.global_batch_size
            window_tokens += int(local["attention_mask"].sum()) * jax.process_count()
            is_last = step == total_steps
            save_now = step % config.checkpoint.every_steps == 0 or is_last
            if step % config.train.log_every_steps == 0 or save_now:
                values = _means(sums)
                sums = None
                _check_finite(values, step, last_saved, workdir)
                elapsed = max(time.time() - window_start, 1e-9)
                values.update(
                    learning_rate=float(learning_rate(step - 1)),
                    examples_per_s=window_examples / elapsed,
                    tokens_per_s=window_tokens / elapsed,
                )
                writers.write(step, "train", values)
                _progress(step, total_steps, values, (step - window_first_step) / elapsed)
                window_start, window_examples, window_tokens = time.time(), 0, 0
                window_first_step = step
            if data.eval_batches and (step % config.eval.every_steps == 0 or is_last):
                last_eval = dev_metrics(state.params)
                writers.write(step, "eval", last_eval)
                _log.info("eval step %d: %s", step, _format(last_eval))
                if best_name in last_eval and last_eval[best_name] > best.get(best_name, -math.inf):
                    best = {**last_eval, "step": step}
                    _save_best(workdir, graphdef, state.params, spec, best)
            if save_now:
                ckpts.save(step, state, data.train.position.to_dict())
                last_saved = step
                _fault_injection(step, workdir)
        if data.eval_batches and not last_eval:  # resumed at the end: report the final model
            last_eval = dev_metrics(state.params)
    finally:
        ckpts.close()
        writers.close()
    _export(workdir / "final", graphdef, state.params, spec)
    results = {
        "final": last_eval,
        "best": best,
        "best_metric": best_name,
        "steps": step,
        "wall_time_s": round(time.time() - started, 1),
        "config": config.to_dict(),
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _teacher(config: ConfigDict, spec: ModelSpec, mesh, rules) -> tuple[Any, Any, Any]:
    """(graphdef, params, None) for a teacher run in the step, or (None, None, cached logits)."""
    if config.distill.teacher_logits:
        path = pathlib.Path(config.distill.teacher_logits)
        if path.is_dir():  # a sharded cache written by bert_mini.teacher_logits (the pipeline)
            return None, None, logits_cache.load_cache(path)
        if not path.is_file():
            raise FileNotFoundError(f"config.distill.teacher_logits not found: {path}")
        return None, None, np.load(path)
    if not config.distill.teacher_checkpoint:
        raise ValueError("distill needs config.distill.teacher_checkpoint or teacher_logits")
    teacher, _ = checkpoints.from_pretrained(
        config.distill.teacher_checkpoint,
        head=spec.head,
        num_labels=spec.num_labels,
        drop_heads=True,
        dtype=config.distill.teacher_dtype,
    )
    graphdef, params = nnx.split(teacher)
    return graphdef, sharding.shard_params(params, mesh, rules), None


def _fault_injection(step: int, workdir: pathlib.Path) -> None:
    """Crash tests: ``BERT_MINI_FAULT_SIGKILL_AT_SAVE=<step>`` kills this process with SIGKILL
    right after that step's asynchronous checkpoint write has started, i.e. mid-write;
    ``BERT_MINI_FAULT_WORKDIR=<text>`` limits it to workdirs whose path contains the text (one
    stage of a pipeline)."""
    if os.environ.get("BERT_MINI_FAULT_SIGKILL_AT_SAVE") != str(step):
        return
    if os.environ.get("BERT_MINI_FAULT_WORKDIR", "") in str(workdir):
        os.kill(os.getpid(), signal.SIGKILL)


def _check_finite(
    values: dict[str, float], step: int, last_saved: int, workdir: pathlib.Path
) -> None:
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        raise FloatingPointError(
            f"non-finite training metrics {bad} by step {step}; stopped without saving; the last "
            f"good checkpoint (step {last_saved}) in {workdir / 'checkpoints'} is intact"
        )


def _export(path: pathlib.Path, graphdef, params, spec: ModelSpec) -> None:
    """A ``from_pretrained``-loadable copy of the model (atomic: the old one stays until done)."""
    host_params = multihost_utils.process_allgather(params, tiled=True)  # all hosts take part
    if jax.process_index() != 0:
        return
    model = nnx.merge(graphdef, host_params)
    checkpoints.save_pretrained(model, spec.tokenizer, path, "bert_mini", overwrite=True)


def _save_best(workdir: pathlib.Path, graphdef, params, spec: ModelSpec, best: dict) -> None:
    _export(workdir / "best", graphdef, params, spec)
    if jax.process_index() == 0:
        (workdir / "best.json").write_text(json.dumps(best, indent=2) + "\n")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in sorted(values.items()))


def _progress(step: int, total: int, values: dict[str, float], steps_per_s: float) -> None:
    rate = values["examples_per_s"]
    eta = (total - step) / max(steps_per_s, 1e-9)
    _log.info(
        "step %d/%d  loss %.4f  lr %.3g  %.1f examples/s  %.0f tokens/s  ETA %s",
        step,
        total,
        values["loss"],
        values["learning_rate"],
        rate,
        values["tokens_per_s"],
        time.strftime("%H:%M:%S", time.gmtime(eta)),
    )
