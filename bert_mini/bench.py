"""Benchmarks that print one JSON line per measurement (easy to grep, diff and plot).

``python -m bert_mini.bench --what input`` asks whether the input pipeline can keep the
accelerator busy: it builds pre-training examples from the Gutenberg corpus, times masked batches
through the full tf.data pipeline (shuffle, batch, dynamic masking, prefetch, numpy out), times a
BERT-Tiny masked-LM train step at the same batch and sequence length on the same machine, and
reports their ratio against a target of 10 (the pipeline should be at least 10x faster than the
step it feeds, so it never is the bottleneck, even for the smallest model).

Every measurement is a dict with a ``bench`` key; ``main`` prints them. More benchmarks plug in
as another ``--what`` choice (see ``WHAT``).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

PIPELINE_TARGET = 10.0  # pipeline batches/s over train steps/s
CORPUS_SPLITS = {
    "valid": ("gutenberg/valid.txt.gz",),
    "train": tuple(f"gutenberg/train-{i:05d}-of-00005.txt.gz" for i in range(5)),
}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    import jax
    import tensorflow as tf

    devices = jax.devices()
    return {
        "bench": "machine",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "tensorflow": tf.__version__,
    }


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


# ---------------------------------------------------------------------- MLM train step


def make_mlm_train_step(model: Any, learning_rate: float = 1e-4):
    """``(params, opt_state, batch, step) -> (params, opt_state, loss)``, jitted, AdamW.

    The model is used functionally: split once, merged inside the step; dropout keys come from
    ``fold_in(key, step)`` so the step is a pure function.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(learning_rate)
    base_key = jax.random.key(0)

    def loss_fn(params, batch, step):
        module = nnx.merge(graphdef, params)
        output = module(
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            masked_positions=batch["masked_positions"],
            deterministic=False,
            rngs=nnx.Rngs(dropout=jax.random.fold_in(base_key, step)),
        )
        logits_BxPxV = output.mlm_logits.astype(jnp.float32)
        losses_BxP = optax.softmax_cross_entropy_with_integer_labels(
            logits_BxPxV, batch["masked_ids"]
        )
        weights_BxP = batch["masked_weights"]
        return jnp.sum(losses_BxP * weights_BxP) / jnp.maximum(jnp.sum(weights_BxP), 1.0)

    @jax.jit
    def train_step(params, opt_state, batch, step):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step, params, optimizer.init(params)


def mlm_step_rate(
    batch: dict[str, np.ndarray], *, variant: str = "tiny", steps: int = 10, warmup: int = 2
) -> dict[str, Any]:
    """Train steps per second of ``variant`` with an MLM head on one fixed, on-device batch."""
    import jax

    from bert_mini.model import BertConfig, create_model

    model = create_model(BertConfig.from_variant(variant), head="mlm")
    train_step, params, opt_state = make_mlm_train_step(model)
    keys = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "masked_ids")
    device_batch = jax.device_put({k: batch[k] for k in (*keys, "masked_weights")})
    start = time.perf_counter()
    for step in range(warmup):
        params, opt_state, loss = train_step(params, opt_state, device_batch, step)
    jax.block_until_ready(loss)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        params, opt_state, loss = train_step(params, opt_state, device_batch, step)
    jax.block_until_ready((params, loss))
    seconds = time.perf_counter() - start
    return {
        "bench": f"{variant}_mlm_train_step",
        "batch": int(batch["input_ids"].shape[0]),
        "seq": int(batch["input_ids"].shape[1]),
        "steps": steps,
        "seconds": round(seconds, 4),
        "steps_per_s": round(steps / seconds, 3),
        "warmup_seconds": round(compile_seconds, 2),
        "final_loss": round(float(loss), 4),
    }


# ------------------------------------------------------------------------------ input


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


def _run_input(args: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_input(
        data_dir=args.data_dir,
        corpus_split=args.corpus_split,
        batch_size=args.batch,
        seq_len=args.seq,
        seed=args.seed,
        pipeline_batches=args.pipeline_batches,
        steps=args.steps,
        whole_word=args.whole_word,
        next_sentence=args.next_sentence,
        cache_dir=args.cache_dir,
    )


# What ``--what`` can run; each takes the parsed flags and returns JSON-ready dicts.
WHAT: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {"input": _run_input}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bert_mini.bench",
        description="Throughput benchmarks; prints one JSON object per line (machine info first).",
        epilog="example: python -m bert_mini.bench --what input --corpus-split train",
    )
    parser.add_argument(
        "--what",
        choices=sorted(WHAT),
        required=True,
        help="which benchmark: 'input' = pre-training input pipeline vs. BERT-Tiny MLM step",
    )
    parser.add_argument(
        "--batch", type=int, default=256, help="batch size (examples per step) (default 256)"
    )
    parser.add_argument(
        "--seq", type=int, default=128, help="sequence length in tokens (default 128)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for examples, shuffle, masks")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder with pretrain/ and vocab/ (default: $BERT_MINI_DATA "
        "or ../shared/data)",
    )
    parser.add_argument(
        "--corpus-split",
        choices=sorted(CORPUS_SPLITS),
        default="valid",
        help="Gutenberg text to build examples from: 'valid' (4 MB, seconds) or 'train' "
        "(5 shards, 146 MB, minutes) (default valid)",
    )
    parser.add_argument(
        "--pipeline-batches",
        type=int,
        default=200,
        help="masked batches to time through the input pipeline (default 200)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="train steps to time after compilation (default 5)"
    )
    parser.add_argument(
        "--whole-word", action="store_true", help="time whole-word masking instead of per-token"
    )
    parser.add_argument(
        "--next-sentence",
        action="store_true",
        help="build BERT [CLS] A [SEP] B [SEP] next-sentence pairs instead of packed sequences",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="reuse/store the unmasked examples in this folder (default: build in memory)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(machine_info()), flush=True)
    for result in WHAT[args.what](args):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
