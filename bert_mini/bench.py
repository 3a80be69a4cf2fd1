"""Benchmarks that print one JSON line per measurement (easy to grep, diff and plot).

``python -m bert_mini.bench --step finetune|pretrain|distill`` times the REAL training step
(``steps.step_function``, jitted with the state donated, exactly as ``train.py`` runs it) on random
data of the right shapes, and reports examples/s, tokens/s, the median step time and the model
FLOPs utilisation (MFU). ``--compare`` also times the same step of HF ``transformers`` (PyTorch,
eager, fp32, AdamW, dropout on; both the "eager" and the "sdpa" attention, the faster one is the
reference) and prints their ratio against a target; ``--step distill --compare`` instead compares
distillation on cached teacher logits with bert_mini's own fine-tuning step (it should cost no
more). The sides of a comparison are timed interleaved, step by step, so a background load hits
them alike.

``python -m bert_mini.bench --what input`` asks whether the input pipeline can keep the
accelerator busy: it builds pre-training examples from the Gutenberg corpus, times masked batches
through the full tf.data pipeline (shuffle, batch, dynamic masking, prefetch, numpy out), times a
BERT-Tiny masked-LM train step at the same batch and sequence length on the same machine, and
reports their ratio against a target of 10 (the pipeline should be at least 10x faster than the
step it feeds, so it never is the bottleneck, even for the smallest model).

Every measurement is a dict with a ``bench`` key; ``main`` prints them, machine info first. More
benchmarks plug in as another ``--what`` choice (see ``WHAT``).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bert_mini import host_memory

PIPELINE_TARGET = 10.0  # pipeline batches/s over train steps/s
CORPUS_SPLITS = {
    "valid": ("gutenberg/valid.txt.gz",),
    "train": tuple(f"gutenberg/train-{i:05d}-of-00005.txt.gz" for i in range(5)),
}

STEPS = ("finetune", "pretrain", "distill")
# The model head each benchmarked step trains.
STEP_HEADS = {"finetune": "classification", "pretrain": "mlm", "distill": "classification"}
# bert_mini examples/s over the reference's: HF transformers for finetune / pretrain (HF computes
# vocabulary logits at every position, bert_mini only at the masked ones), bert_mini's own
# fine-tuning step for distill (cached teacher logits must make distillation cost no more).
COMPARE_TARGETS = {"finetune": 1.5, "pretrain": 2.5, "distill": 0.95}
# PyTorch's OpenMP workers spin at every barrier by default; with any other busy process on the
# machine one of them is descheduled and every parallel region waits for it (measured here: the
# HF step went from 1.4 s to 5.9 s under a background job, while bert_mini's did not move).
# Sleeping workers cost nothing measurable on an idle machine, so the reference is not handicapped.
TORCH_OMP_WAIT_POLICY = "PASSIVE"

# Dense peak FLOP/s by device-kind substring (vendor data sheets; first match wins, so the PCIe
# H100 comes before the SXM one). "tf32" is a float32 matmul at JAX's default GPU precision.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
)


class BenchError(Exception):
    """Bad flags or a missing optional dependency: ``main`` prints it as one line."""


def machine_info(extra: Sequence[str] = ("tensorflow",)) -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it).

    ``extra`` names further packages whose versions matter to the benchmark being run; imported
    here only for their version, so pass only those the benchmark imports anyway.
    """
    import importlib

    import jax

    devices = jax.devices()
    info = {
        "bench": "machine",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "matmul_precision": jax.config.jax_default_matmul_precision,
    }
    for name in extra:
        info[name] = importlib.import_module(name).__version__
    return info


# -------------------------------------------------------------------------- input pipeline


def _timed_batches(
    make_epoch: Callable[[int], Any], num_batches: int, warmup: int
) -> tuple[float, int]:
    """Seconds for ``num_batches`` numpy batches after ``warmup``, crossing epochs as needed."""

    def stream() -> Iterator[dict[str, np.ndarray]]:
        epoch = 0
        while True:
            produced = 0
            for batch in make_epoch(epoch).as_numpy_iterator():
                produced += 1
                yield batch
            if produced == 0:
                raise ValueError("an epoch yielded no batch: fewer examples than one batch")
            epoch += 1

    batches = stream()
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return time.perf_counter() - start, num_batches


def pipeline_rate(
    examples: dict[str, np.ndarray],
    masking: Any,
    *,
    batch_size: int,
    seed: int,
    num_batches: int,
    warmup: int = 5,
) -> dict[str, Any]:
    """Masked pre-training batches per second through ``pretraining_dataset``."""
    import tensorflow as tf

    from bert_mini.data.masking import pretraining_dataset

    tensors = {key: tf.constant(values) for key, values in examples.items()}
    seconds, count = _timed_batches(
        lambda epoch: pretraining_dataset(tensors, batch_size, seed, epoch, masking),
        num_batches,
        warmup,
    )
    return {
        "bench": "input_pipeline",
        "batch": batch_size,
        "seq": int(examples["input_ids"].shape[1]),
        "batches": count,
        "seconds": round(seconds, 4),
        "batches_per_s": round(count / seconds, 2),
        "examples_per_s": round(count * batch_size / seconds, 1),
    }


# ---------------------------------------------------------------------- FLOPs and peak


def encoder_layer_params(config: Any) -> int:
    """Parameters of one encoder layer: Q, K, V, O (+ biases), FFN in/out (+ biases), 2 LNs."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden
    feed_forward = (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * hidden
    return attention + feed_forward


def train_flops(
    config: Any,
    step: str,
    *,
    batch: int,
    seq: int,
    predictions: int = 0,
    num_labels: int = 2,
) -> int:
    """Model FLOPs of one training step (forward + backward = 3x the forward's 2 FLOPs/MAC).

    The work the step needs: every layer but the last on every token (6 x non-embedding layer
    params x tokens, plus attention, 12 S H FLOPs per token and layer); the last layer's keys and
    values on every token but the rest of it only on the rows the heads read ([CLS], plus the
    ``predictions`` masked positions for pretrain: what ``heads_only`` computes); then the head:
    pooler + classifier on [CLS] (finetune, distill), or the MLM transform, LayerNorm and tied
    vocabulary decoder at the masked positions (pretrain). The same count divides every side of
    a comparison, so an implementation that computes rows nobody reads gets no credit for them.
    Embedding lookups and elementwise work (softmax, GELU, dropout, the optimizer) are not model
    FLOPs.
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {list(STEPS)}")
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    tokens = batch * seq
    head_rows = batch * (1 + predictions if step == "pretrain" else 1)
    layer_params = encoder_layer_params(config)
    key_value_params = 2 * (hidden * hidden + hidden)
    full_layers = max(layers - 1, 0)
    encoder = 6 * full_layers * layer_params * tokens
    attention = 12 * full_layers * seq * hidden * tokens
    if layers:
        encoder += 6 * (key_value_params * tokens + (layer_params - key_value_params) * head_rows)
        attention += 12 * seq * hidden * head_rows
    if step == "pretrain":
        head_params = (hidden * hidden + hidden) + 2 * hidden + (hidden * vocab + vocab)
        head = 6 * head_params * batch * predictions
    else:
        head_params = (hidden * hidden + hidden) + (hidden * num_labels + num_labels)
        head = 6 * head_params * batch
    return encoder + attention + head


def gpu_peak_flops(device_kind: str, dtype: str, matmul_precision: str | None) -> float | None:
    """The table's dense peak for this GPU and compute dtype, None for an unknown GPU.

    float32 matmuls run as TF32 on these GPUs unless JAX's matmul precision is "highest".
    """
    if dtype in ("bfloat16", "float16"):
        column = "bfloat16"
    elif matmul_precision in ("highest", "float32"):
        column = "float32"
    else:
        column = "tf32"
    for kind, peaks in GPU_PEAK_FLOPS:
        if kind.lower() in device_kind.lower():
            return peaks[column]
    return None


def measure_matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """The best FLOP/s of a jitted ``size`` x ``size`` float32 matmul on the default device."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (size, size), jnp.float32)
    b = jax.random.normal(keys[1], (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))  # compile
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(dtype: str, override: float | None = None) -> dict[str, Any]:
    """``{"peak_flops", "source"}``: the flag, the GPU table, or a measured CPU matmul peak."""
    import jax

    if override is not None:
        return {"peak_flops": float(override), "source": "--peak-flops"}
    device = jax.devices()[0]
    if device.platform == "cpu":
        size = 2048
        return {
            "peak_flops": measure_matmul_flops(size),
            "source": f"measured: best jitted float32 {size}x{size} matmul on this CPU "
            "(other load on the machine lowers it)",
        }
    peak = gpu_peak_flops(device.device_kind, dtype, jax.config.jax_default_matmul_precision)
    if peak is None:
        return {
            "peak_flops": None,
            "source": f"unknown device kind {device.device_kind!r}: pass --peak-flops",
        }
    return {"peak_flops": peak, "source": f"table: {device.device_kind} {dtype}"}


# ---------------------------------------------------------------------- random batches


def random_batch(
    step: str,
    *,
    vocab_size: int,
    batch: int,
    seq: int,
    predictions: int = 0,
    num_labels: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A batch of random data with the keys and shapes the ``step`` reads (no padding).

    Pre-training gets ``predictions`` distinct masked positions per row (never [CLS]) with
    weights 1; distillation gets cached teacher logits and no labels (transfer data is unlabeled).
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {list(STEPS)}")
    rng = np.random.default_rng(seed)
    ids_BxS = rng.integers(0, vocab_size, (batch, seq), dtype=np.int32)
    types_BxS = np.zeros((batch, seq), np.int32)
    types_BxS[:, seq // 2 :] = 1  # a sentence pair: A in the first half, B in the second
    out = {
        "input_ids": ids_BxS,
        "token_type_ids": types_BxS,
        "attention_mask": np.ones((batch, seq), np.int32),
    }
    if step == "pretrain":
        if not 1 <= predictions < seq:
            raise ValueError(f"predictions must be in [1, seq={seq}), got {predictions}")
        positions_BxP = np.stack(
            [
                np.sort(rng.choice(np.arange(1, seq), predictions, replace=False))
                for _ in range(batch)
            ]
        ).astype(np.int32)
        out["masked_positions"] = positions_BxP
        out["masked_ids"] = np.take_along_axis(ids_BxS, positions_BxP, axis=1)
        out["masked_weights"] = np.ones((batch, predictions), np.float32)
    elif step == "finetune":
        out["label"] = rng.integers(0, num_labels, (batch,), dtype=np.int32)
    else:
        out["teacher_logits"] = rng.normal(size=(batch, num_labels)).astype(np.float32)
    return out


# ---------------------------------------------------------------------- timed steps


@dataclasses.dataclass
class StepRunner:
    """One side of a benchmark: ``run()`` does one complete, finished train step."""

    impl: str  # "bert_mini" or "transformers"
    step: str
    run: Callable[[], None]
    loss: Callable[[], float]  # the last step's loss, for a sanity check
    attn_implementation: str | None = None

    @property
    def name(self) -> str:
        return " ".join(part for part in (self.impl, self.step, self.attn_implementation) if part)


def bert_mini_runner(
    step: str,
    config: Any,
    batch: Mapping[str, np.ndarray],
    *,
    num_labels: int = 2,
    seed: int = 0,
    head: str | None = None,
) -> StepRunner:
    """The real bert_mini ``step`` as train.py runs it, on a one-device mesh, ``batch`` fixed.

    Sharded init, ``optim.make_optimizer`` (AdamW, decay mask, clipping), ``create_train_state``
    and ``jax.jit(step, out_shardings=(state shardings, None), donate_argnums=0)``.
    """
    import jax

    from bert_mini import optim, sharding, steps
    from bert_mini.model import create_model

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, params = sharding.init_sharded(
        lambda: create_model(config, head or STEP_HEADS[step], num_labels, seed),
        mesh,
        sharding.DEFAULT_RULES,
    )
    optimizer = optim.make_optimizer(
        learning_rate=1e-4, warmup_steps=10, total_steps=10_000, params=params
    )
    state = jax.jit(functools.partial(steps.create_train_state, optimizer=optimizer, seed=seed))(
        params
    )
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    kind = "pretrain" if step == "pretrain" else "classification"
    train_fn = steps.step_function(kind, step, graphdef=graphdef, optimizer=optimizer)
    train_step = jax.jit(train_fn, out_shardings=(state_shardings, None), donate_argnums=0)
    device_batch = sharding.global_batch(batch, mesh)
    holder: dict[str, Any] = {"state": state, "metrics": None}

    def run() -> None:
        holder["state"], holder["metrics"] = train_step(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], holder["metrics"]))

    def loss() -> float:
        total, count = holder["metrics"]["loss"]
        return float(total) / max(float(count), 1e-9)

    return StepRunner("bert_mini", step, run, loss)


def hf_bert_config(config: Any, *, num_labels: int, attn_implementation: str) -> Any:
    """The ``transformers.BertConfig`` with bert_mini's dims, activation and dropout."""
    import transformers

    activation = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[config.hidden_act]
    return transformers.BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=activation,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )


def _set_omp_wait_policy() -> None:
    """``OMP_WAIT_POLICY`` for PyTorch (read once, when torch loads OpenMP; a user's value wins)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", TORCH_OMP_WAIT_POLICY)


def transformers_runner(
    step: str,
    config: Any,
    batch: Mapping[str, np.ndarray],
    *,
    attn_implementation: str,
    num_labels: int = 2,
    seed: int = 0,
) -> StepRunner:
    """The same step as HF users write it: eager PyTorch, fp32, train mode, AdamW, clipping.

    Fine-tuning: ``BertForSequenceClassification`` with labels. Pre-training:
    ``BertForMaskedLM`` with labels -100 except at the masked positions (HF computes the
    vocabulary logits at every position). Gradients are clipped to norm 1 like the HF Trainer
    and bert_mini's optimizer do.
    """
    _set_omp_wait_policy()
    try:
        import torch
        import transformers
    except ImportError as error:
        raise BenchError(
            f"--compare needs torch and transformers (pip install -e '.[test]'): {error}"
        ) from None
    if step not in ("finetune", "pretrain"):
        raise ValueError(f"transformers has no {step!r} step here; use finetune or pretrain")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    hf_config = hf_bert_config(
        config, num_labels=num_labels, attn_implementation=attn_implementation
    )
    if step == "finetune":
        model = transformers.BertForSequenceClassification(hf_config)
        labels = torch.from_numpy(batch["label"].astype(np.int64))
    else:
        model = transformers.BertForMaskedLM(hf_config)
        labels_BxS = np.full(batch["input_ids"].shape, -100, np.int64)
        np.put_along_axis(labels_BxS, batch["masked_positions"], batch["masked_ids"], axis=1)
        labels = torch.from_numpy(labels_BxS)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    inputs = {
        key: torch.from_numpy(batch[key].astype(np.int64))
        for key in ("input_ids", "token_type_ids", "attention_mask")
    }
    last: dict[str, Any] = {}

    def run() -> None:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    return StepRunner("transformers", step, run, lambda: float(last["loss"]), attn_implementation)


def torch_settings() -> dict[str, Any]:
    """How PyTorch ran: threads and the OpenMP wait policy (unknown if torch came in earlier)."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def time_interleaved(
    runners: Sequence[StepRunner], *, steps: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Per runner: first-call seconds (compilation) and ``steps`` timed step seconds.

    All runners compile and warm up first; then the timed steps go round-robin, one step each,
    with the starting runner rotating, so background load and thermal drift hit every side alike.
    """
    results: dict[str, dict[str, Any]] = {}
    for runner in runners:
        start = time.perf_counter()
        runner.run()
        results[runner.name] = {"first_call_s": time.perf_counter() - start, "times": []}
    for runner in runners:
        for _ in range(warmup):
            runner.run()
    for index in range(steps):
        shift = index % len(runners)
        for runner in (*runners[shift:], *runners[:shift]):
            start = time.perf_counter()
            runner.run()
            results[runner.name]["times"].append(time.perf_counter() - start)
    for runner in runners:
        results[runner.name]["loss"] = runner.loss()
    return results


def _round(value: float | None, digits: int = 4) -> float | None:
    """Rounded to ``digits`` significant digits (JSON stays readable at any scale)."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def step_record(
    timing: Mapping[str, Any],
    *,
    impl: str,
    step: str,
    batch: int,
    seq: int,
    flops_per_step: int,
    peak: Mapping[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """One JSON line of a timed step: median time, throughput, FLOPs and MFU."""
    times = timing["times"]
    median = statistics.median(times)
    peak_value = peak["peak_flops"]
    return {
        "bench": "step",
        "impl": impl,
        "step": step,
        **fields,
        "batch": batch,
        "seq": seq,
        "steps": len(times),
        "step_time_s": _round(median),
        "step_time_min_s": _round(min(times)),
        "step_time_max_s": _round(max(times)),
        "examples_per_s": _round(batch / median),
        "tokens_per_s": _round(batch * seq / median),
        "flops_per_step": flops_per_step,
        "mfu": _round(flops_per_step / median / peak_value) if peak_value else None,
        "peak_flops": _round(peak_value),
        "compile_s": _round(timing["first_call_s"], 3),
        "loss": _round(timing["loss"]),
    }


def compare_record(
    step: str, mine: Mapping[str, Any], reference: Mapping[str, Any], reference_name: str
) -> dict[str, Any]:
    """The ratio line: bert_mini examples/s over the reference's, against the step's target."""
    ratio = mine["examples_per_s"] / reference["examples_per_s"]
    target = COMPARE_TARGETS[step]
    record = {
        "bench": "compare",
        "step": step,
        "bert_mini_examples_per_s": mine["examples_per_s"],
    }
    if step == "distill":
        record["bert_mini_finetune_examples_per_s"] = reference["examples_per_s"]
    else:
        record["transformers_examples_per_s"] = reference["examples_per_s"]
    record.update(
        reference=reference_name,
        ratio=_round(ratio),
        target=target,
        ok=bool(ratio >= target),
    )
    return record


def bench_step(
    step: str,
    *,
    variant: str = "mini",
    batch: int = 32,
    seq: int = 128,
    dtype: str = "float32",
    predictions: int = 20,
    num_labels: int = 2,
    steps: int = 10,
    warmup: int = 2,
    compare: bool = False,
    peak: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """JSON dicts: the peak used for MFU, one line per timed step, and with ``compare`` the
    reference steps and the ratio line."""
    from bert_mini.config_lib import canonical_variant
    from bert_mini.model import BertConfig

    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {list(STEPS)}")
    config = BertConfig.from_variant(variant, dtype=dtype)
    if seq > config.max_position_embeddings:
        raise ValueError(
            f"seq {seq} exceeds max_position_embeddings {config.max_position_embeddings}"
        )
    predictions = predictions if step == "pretrain" else 0
    data = random_batch(
        step,
        vocab_size=config.vocab_size,
        batch=batch,
        seq=seq,
        predictions=predictions,
        num_labels=num_labels,
        seed=seed,
    )
    runners = [bert_mini_runner(step, config, data, num_labels=num_labels, seed=seed)]
    if compare and step == "distill":
        finetune_data = {**data, "label": np.zeros((batch,), np.int32)}
        runners.append(
            bert_mini_runner("finetune", config, finetune_data, num_labels=num_labels, seed=seed)
        )
    elif compare:
        hf_config = dataclasses.replace(config, dtype="float32")
        for attention in ("eager", "sdpa"):
            runners.append(
                transformers_runner(
                    step,
                    hf_config,
                    data,
                    attn_implementation=attention,
                    num_labels=num_labels,
                    seed=seed,
                )
            )
    peak_info = peak_flops(dtype, peak)
    results: list[dict[str, Any]] = [
        {"bench": "peak_flops", **peak_info, "peak_flops": _round(peak_info["peak_flops"])}
    ]
    timings = time_interleaved(runners, steps=steps, warmup=warmup)
    records = []
    for runner in runners:
        fields: dict[str, Any] = {"variant": canonical_variant(variant)}
        if runner.impl == "bert_mini":
            fields["dtype"] = dtype
        else:
            fields.update(
                dtype="float32", attn_implementation=runner.attn_implementation, **torch_settings()
            )
        if runner.step == "pretrain":
            fields["predictions"] = predictions
        useful = train_flops(
            config,
            runner.step,
            batch=batch,
            seq=seq,
            predictions=predictions,
            num_labels=num_labels,
        )
        records.append(
            step_record(
                timings[runner.name],
                impl=runner.impl,
                step=runner.step,
                batch=batch,
                seq=seq,
                flops_per_step=useful,
                peak=peak_info,
                **fields,
            )
        )
    results.extend(records)
    if compare:
        mine, references = records[0], records[1:]
        fastest = max(references, key=lambda record: record["examples_per_s"])
        name = (
            "bert_mini finetune"
            if step == "distill"
            else f"transformers {fastest['attn_implementation']}"
        )
        results.append(compare_record(step, mine, fastest, name))
    return results


# ------------------------------------------------------------------------------ input


def mlm_step_rate(
    batch: dict[str, np.ndarray], *, variant: str = "tiny", steps: int = 10, warmup: int = 2
) -> dict[str, Any]:
    """Train steps per second of the real pre-training step of ``variant`` on one fixed batch."""
    from bert_mini.model import BertConfig

    head = "pretraining" if "next_sentence_label" in batch else "mlm"
    runner = bert_mini_runner("pretrain", BertConfig.from_variant(variant), batch, head=head)
    timing = time_interleaved([runner], steps=steps, warmup=max(warmup - 1, 0))[runner.name]
    seconds = sum(timing["times"])
    return {
        "bench": f"{variant}_mlm_train_step",
        "batch": int(batch["input_ids"].shape[0]),
        "seq": int(batch["input_ids"].shape[1]),
        "steps": steps,
        "seconds": round(seconds, 4),
        "steps_per_s": round(steps / seconds, 3),
        "step_time_s": _round(statistics.median(timing["times"])),
        "compile_s": round(timing["first_call_s"], 2),
        "final_loss": round(timing["loss"], 4),
    }


def bench_input(
    *,
    data_dir: str | os.PathLike | None = None,
    corpus_split: str = "valid",
    batch_size: int = 256,
    seq_len: int = 128,
    seed: int = 0,
    pipeline_batches: int = 200,
    steps: int = 5,
    whole_word: bool = False,
    next_sentence: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Example creation time, pipeline rate, BERT-Tiny step rate and their ratio (JSON dicts)."""
    from bert_mini.data.corpus import read_documents, resolve_files
    from bert_mini.data.masking import MaskingConfig, default_max_predictions
    from bert_mini.data.pretraining import cached_pretraining_examples, create_pretraining_examples
    from bert_mini.paths import shared_data_dir
    from bert_mini.tokenization import BertTokenizer

    if corpus_split not in CORPUS_SPLITS:
        raise ValueError(
            f"unknown corpus split {corpus_split!r}; choose one of {list(CORPUS_SPLITS)}"
        )
    root = pathlib.Path(data_dir) if data_dir else shared_data_dir()
    tokenizer = BertTokenizer(
        resolve_files(["vocab/bert-base-uncased-vocab.txt"], root, "see ../shared/data/SOURCES.md")[
            0
        ]
    )
    files = resolve_files(
        [f"pretrain/{name}" for name in CORPUS_SPLITS[corpus_split]],
        root,
        "the Gutenberg shards are in ../shared/data/pretrain/gutenberg (see SOURCES.md)",
    )
    options = {"max_seq_length": seq_len, "next_sentence": next_sentence, "seed": seed}
    start = time.perf_counter()
    if cache_dir:
        examples = cached_pretraining_examples(files, tokenizer, cache_dir, **options)
    else:
        examples = create_pretraining_examples(read_documents(files), tokenizer, **options)
    creation_seconds = time.perf_counter() - start
    mask = examples["attention_mask"]
    results = [
        {
            "bench": "example_creation",
            "corpus": f"gutenberg/{corpus_split}",
            "files": len(files),
            "examples": int(mask.shape[0]),
            "tokens": int(mask.sum()),
            "fill": round(float(mask.mean()), 4),
            "seconds": round(creation_seconds, 2),
            "cached": bool(cache_dir),
        }
    ]
    masking = MaskingConfig.from_tokenizer(
        tokenizer, max_predictions=default_max_predictions(seq_len), whole_word=whole_word
    )
    pipeline = pipeline_rate(
        examples, masking, batch_size=batch_size, seed=seed, num_batches=pipeline_batches
    )
    pipeline["whole_word"] = whole_word
    results.append(pipeline)

    from bert_mini.data.masking import pretraining_dataset

    one_batch = next(
        pretraining_dataset(examples, batch_size, seed, 0, masking).as_numpy_iterator()
    )
    step = mlm_step_rate(one_batch, variant="tiny", steps=steps)
    results.append(step)
    ratio = pipeline["batches_per_s"] / step["steps_per_s"]
    results.append(
        {
            "bench": "input_vs_step",
            "pipeline_over_step": round(ratio, 2),
            "target": PIPELINE_TARGET,
            "ok": bool(ratio >= PIPELINE_TARGET),
        }
    )
    return results


# ------------------------------------------------------------------------------ CLI


def _run_input(args: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_input(
        data_dir=args.data_dir,
        corpus_split=args.corpus_split,
        batch_size=args.batch or 256,
        seq_len=args.seq,
        seed=args.seed,
        pipeline_batches=args.pipeline_batches,
        steps=args.steps or 5,
        whole_word=args.whole_word,
        next_sentence=args.next_sentence,
        cache_dir=args.cache_dir,
    )


def _run_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_step(
        args.step,
        variant=args.variant,
        batch=args.batch or 32,
        seq=args.seq,
        dtype=args.dtype,
        predictions=args.predictions,
        num_labels=args.num_labels,
        steps=args.steps or 10,
        warmup=args.warmup,
        compare=args.compare,
        peak=args.peak_flops,
        seed=args.seed,
    )


# What ``--what`` can run; each takes the parsed flags and returns JSON-ready dicts.
WHAT: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "input": _run_input,
    "step": _run_step,
}
# Versions worth recording next to each benchmark (beyond jax).
WHAT_PACKAGES = {"input": ("tensorflow",), "step": ("flax", "optax")}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a ``BenchError`` (one line from ``main``), not usage + exit."""

    def error(self, message: str) -> Any:
        raise BenchError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _variant(text: str) -> str:
    from bert_mini.config_lib import canonical_variant

    try:
        return canonical_variant(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bert_mini.bench",
        description="Throughput benchmarks; prints one JSON object per line (machine info first).",
        epilog="examples: python -m bert_mini.bench --step pretrain --variant L-4_H-256 "
        "--batch 32 --seq 128 --compare;  python -m bert_mini.bench --what input",
    )
    parser.add_argument(
        "--what",
        choices=sorted(WHAT),
        default=None,
        help="which benchmark: 'step' = a train step (implied by --step), 'input' = "
        "pre-training input pipeline vs. BERT-Tiny MLM step",
    )
    parser.add_argument(
        "--step",
        choices=STEPS,
        default=None,
        help="time this real bert_mini train step on random data: finetune (classification), "
        "pretrain (masked LM) or distill (cached teacher logits)",
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        default="L-4_H-256",
        help="model size for --step: L-<layers>_H-<hidden> or tiny/mini/small/medium/base "
        "(default L-4_H-256)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of bert_mini's step; parameters stay float32 (default float32)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time HF transformers (PyTorch eager, fp32; eager and sdpa attention) or, for "
        "distill, bert_mini's finetune step, and print the ratio against its target",
    )
    parser.add_argument(
        "--predictions",
        type=_positive_int,
        default=None,
        help="masked positions per row for --step pretrain (default 15%% of --seq rounded up "
        "to a multiple of 4: 20 at 128)",
    )
    parser.add_argument(
        "--num-labels", type=_positive_int, default=2, help="classes for finetune/distill (2)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per side after the compiling first call (default 2)",
    )
    parser.add_argument(
        "--peak-flops",
        type=_positive_float,
        default=None,
        help="peak FLOP/s for MFU (default: GPU table by device kind; on CPU measured with a "
        "large jitted float32 matmul)",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="batch size (examples per step) (default 32 for --step, 256 for --what input)",
    )
    parser.add_argument(
        "--seq", type=_positive_int, default=128, help="sequence length in tokens (default 128)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for examples, shuffle, masks")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="timed train steps after compilation and warmup; --step reports their median "
        "(default 10 for --step, 5 for --what input)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="--what input: the shared data folder with pretrain/ and vocab/ (default: "
        "$BERT_MINI_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--corpus-split",
        choices=sorted(CORPUS_SPLITS),
        default="valid",
        help="--what input: Gutenberg text to build examples from: 'valid' (4 MB, seconds) or "
        "'train' (5 shards, 146 MB, minutes) (default valid)",
    )
    parser.add_argument(
        "--pipeline-batches",
        type=_positive_int,
        default=200,
        help="--what input: masked batches to time through the input pipeline (default 200)",
    )
    parser.add_argument(
        "--whole-word",
        action="store_true",
        help="--what input: time whole-word masking instead of per-token",
    )
    parser.add_argument(
        "--next-sentence",
        action="store_true",
        help="--what input: build BERT [CLS] A [SEP] B [SEP] next-sentence pairs instead of "
        "packed sequences",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="--what input: reuse/store the unmasked examples in this folder (default: build in "
        "memory)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags with ``what`` resolved (``--step`` implies ``step``); BenchError when they clash."""
    args = build_parser().parse_args(argv)
    if args.step is not None and args.what not in (None, "step"):
        raise BenchError(f"--step {args.step} cannot be combined with --what {args.what}")
    args.what = args.what or ("step" if args.step else None)
    if args.what is None:
        raise BenchError(f"give --step {{{','.join(STEPS)}}} or --what {{{','.join(WHAT)}}}")
    if args.what == "step" and args.step is None:
        raise BenchError(f"--what step needs --step {{{','.join(STEPS)}}}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.what == "step":
        from bert_mini.model import BertConfig

        max_positions = BertConfig.max_position_embeddings
        if args.seq > max_positions:
            raise BenchError(f"--seq {args.seq} exceeds max_position_embeddings {max_positions}")
        # Google's max_predictions_per_seq: 15% of the tokens rounded up to a multiple of 4.
        args.predictions = args.predictions or 4 * math.ceil(args.seq * 0.15 / 4)
        if args.step == "pretrain" and args.predictions >= args.seq:
            raise BenchError(
                f"--predictions {args.predictions} must be smaller than --seq {args.seq}"
            )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; bad flags or a missing optional package: one line on stderr, rc 2."""
    try:
        args = parse_args(argv)
        malloc_tuned = host_memory.keep_freed_memory()  # before JAX / torch start threads
        extra = WHAT_PACKAGES[args.what]
        if args.what == "step" and args.compare and args.step != "distill":
            extra = (*extra, "transformers", "torch")  # transformers first: fails fastest
            _set_omp_wait_policy()  # before machine_info imports torch
        try:
            info = machine_info(extra)
        except ImportError as error:
            raise BenchError(
                f"--compare needs torch and transformers (pip install -e '.[test]'): {error}"
            ) from None
        info["malloc_tuning"] = malloc_tuned
        print(json.dumps(info), flush=True)
        for result in WHAT[args.what](args):
            print(json.dumps(result), flush=True)
    except BenchError as error:
        print(f"python -m bert_mini.bench: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
