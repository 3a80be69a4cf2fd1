"""Tests of ``bert_mini.bench``'s step benchmark: FLOPs formula, peak table, CLI output, errors.

The CLI runs go through ``main([...])`` on BERT-Tiny with a handful of steps (compilation
dominates); ``--peak-flops`` is given so MFU can be checked exactly and no CPU peak is measured.
"""

import json
import math
import os
import sys

import numpy as np
import pytest
from flax import nnx

from bert_mini import bench
from bert_mini.model import BertConfig, count_params, create_model

PEAK = 1e11

# L=2, H=4, F=8, V=10: small enough to count by hand.
HAND_CONFIG = BertConfig(
    vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=1, intermediate_size=8
)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _run(capsys, argv: list[str]) -> list[dict]:
    assert bench.main(argv) == 0
    return _lines(capsys.readouterr().out)  # every stdout line must be one JSON object


# ----------------------------------------------------------------------------- FLOPs and peak


def test_encoder_layer_params_match_the_model():
    model = nnx.eval_shape(lambda: create_model(HAND_CONFIG, head="classification"))
    layer_params = count_params(model.layers[0])
    # Q, K, V, O: 4 x (16 + 4); two LayerNorms: 2 x 8; FFN: (32 + 8) + (32 + 4).
    assert bench.encoder_layer_params(HAND_CONFIG) == 172 == layer_params


def test_train_flops_against_a_hand_count():
    # tokens = 2 x 3 = 6. Layer 1 on every token: 6 x 172 x 6 = 6192. Last layer: keys and
    # values (2 x (16 + 4) = 40 params) on every token, the other 132 params on the B = 2 [CLS]
    # rows: 6 x (40 x 6 + 132 x 2) = 3024. Encoder 9216.
    # Attention: 12 x S=3 x H=4 x 6 tokens = 864 for layer 1, 12 x 3 x 4 x 2 rows = 288 for the
    # last: 1152.
    # finetune head: pooler (16 + 4) + classifier (8 + 2) = 30 params on B=2 rows: 6 x 30 x 2 = 360.
    assert bench.train_flops(HAND_CONFIG, "finetune", batch=2, seq=3) == 9216 + 1152 + 360
    assert bench.train_flops(HAND_CONFIG, "distill", batch=2, seq=3) == 9216 + 1152 + 360
    # 3 labels: classifier 4 x 3 + 3 = 15, head 35 params: 6 x 35 x 2 = 420.
    assert bench.train_flops(HAND_CONFIG, "finetune", batch=2, seq=3, num_labels=3) == (
        9216 + 1152 + 420
    )
    # pretrain, P=1: the last layer's rows are [CLS] + 1 masked position = 4 rows:
    # encoder 6192 + 6 x (40 x 6 + 132 x 4) = 10800; attention 864 + 12 x 3 x 4 x 4 = 1440.
    # MLM head at P=1 masked position per row: transform 20 + LN 8 + decoder 40 + bias 10 = 78
    # params on B x P = 2 rows: 6 x 78 x 2 = 936 (not at all 6 positions).
    assert bench.train_flops(HAND_CONFIG, "pretrain", batch=2, seq=3, predictions=1) == (
        10800 + 1440 + 936
    )
    with pytest.raises(ValueError, match="unknown step 'nope'"):
        bench.train_flops(HAND_CONFIG, "nope", batch=2, seq=3)


def test_gpu_peak_table():
    h100 = "NVIDIA H100 80GB HBM3"
    assert bench.gpu_peak_flops(h100, "bfloat16", None) == 989e12
    assert bench.gpu_peak_flops(h100, "float32", None) == 494e12  # TF32 at default precision
    assert bench.gpu_peak_flops(h100, "float32", "highest") == 67e12
    assert bench.gpu_peak_flops("NVIDIA H200", "bfloat16", None) == 989e12
    assert bench.gpu_peak_flops("NVIDIA H100 PCIe", "bfloat16", None) == 756e12
    assert bench.gpu_peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16", None) == 312e12
    assert bench.gpu_peak_flops("Tesla T4", "bfloat16", None) is None


def test_measured_matmul_peak_is_plausible():
    flops = bench.measure_matmul_flops(size=256, repeats=2)
    assert 1e8 < flops < 1e14


def test_random_pretrain_batch_masks_distinct_positions():
    batch = bench.random_batch("pretrain", vocab_size=50, batch=3, seq=8, predictions=4, seed=1)
    positions = batch["masked_positions"]
    assert positions.shape == (3, 4) and positions.dtype == np.int32
    assert all(len(set(row)) == 4 for row in positions.tolist())
    assert positions.min() >= 1 and positions.max() < 8
    np.testing.assert_array_equal(
        batch["masked_ids"], np.take_along_axis(batch["input_ids"], positions, axis=1)
    )
    distill = bench.random_batch("distill", vocab_size=50, batch=3, seq=8, num_labels=3)
    assert distill["teacher_logits"].shape == (3, 3) and "label" not in distill


# ----------------------------------------------------------------------------- CLI runs


def test_finetune_step_prints_json_lines(capsys):
    records = _run(
        capsys,
        ["--step", "finetune", "--variant", "tiny", "--batch", "4", "--seq", "16"]
        + ["--steps", "2", "--peak-flops", str(PEAK)],
    )
    assert records[0]["bench"] == "machine" and records[0]["jax_backend"] == "cpu"
    assert records[1] == {"bench": "peak_flops", "peak_flops": PEAK, "source": "--peak-flops"}
    (step,) = [r for r in records if r["bench"] == "step"]
    assert len(records) == 3
    assert (step["impl"], step["step"], step["variant"], step["dtype"]) == (
        "bert_mini",
        "finetune",
        "L-2_H-128",
        "float32",
    )
    assert (step["batch"], step["seq"], step["steps"]) == (4, 16, 2)
    assert step["step_time_min_s"] <= step["step_time_s"] <= step["step_time_max_s"]
    assert step["examples_per_s"] == pytest.approx(4 / step["step_time_s"], rel=2e-3)
    assert step["tokens_per_s"] == pytest.approx(16 * step["examples_per_s"], rel=2e-3)
    config = BertConfig.from_variant("tiny")
    assert step["flops_per_step"] == bench.train_flops(config, "finetune", batch=4, seq=16)
    expected_mfu = step["flops_per_step"] / step["step_time_s"] / PEAK
    assert step["mfu"] == pytest.approx(expected_mfu, rel=2e-3)
    assert abs(step["loss"] - math.log(2)) < 0.3  # random labels, near-uniform predictions


def test_compare_prints_both_sides_and_the_ratio(capsys):
    records = _run(
        capsys,
        ["--step", "pretrain", "--variant", "tiny", "--batch", "2", "--seq", "16"]
        + ["--predictions", "3", "--steps", "1", "--warmup", "0", "--compare"]
        + ["--peak-flops", str(PEAK)],
    )
    assert "torch" in records[0] and "transformers" in records[0]
    steps = {(r["impl"], r.get("attn_implementation")): r for r in records if r["bench"] == "step"}
    assert set(steps) == {("bert_mini", None), ("transformers", "eager"), ("transformers", "sdpa")}
    for record in steps.values():
        assert record["step"] == "pretrain" and record["predictions"] == 3
        assert record["examples_per_s"] > 0 and math.isfinite(record["loss"])
        if record["impl"] == "transformers":
            assert record["torch_threads"] == os.cpu_count() and record["dtype"] == "float32"
        # Same useful work on both sides: HF's logits at unmasked positions are not model FLOPs.
        assert record["flops_per_step"] == steps[("bert_mini", None)]["flops_per_step"]
    (compare,) = [r for r in records if r["bench"] == "compare"]
    fastest = max(
        steps[("transformers", "eager")]["examples_per_s"],
        steps[("transformers", "sdpa")]["examples_per_s"],
    )
    assert compare["step"] == "pretrain" and compare["target"] == 2.5
    assert compare["bert_mini_examples_per_s"] == steps[("bert_mini", None)]["examples_per_s"] > 0
    assert compare["transformers_examples_per_s"] == fastest > 0
    assert compare["ratio"] == pytest.approx(compare["bert_mini_examples_per_s"] / fastest, 1e-3)
    assert compare["ok"] is (compare["ratio"] >= 2.5)
    assert compare["reference"] in ("transformers eager", "transformers sdpa")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step", "nope"], "argument --step: invalid choice: 'nope'"),
        (["--step", "finetune", "--batch", "0"], "argument --batch: must be a positive integer"),
        (["--step", "finetune", "--batch", "-3"], "argument --batch: must be a positive integer"),
        (["--step", "finetune", "--batch", "x"], "argument --batch: 'x' is not an integer"),
        ([], "give --step {finetune,pretrain,distill} or --what {input,step}"),
        (["--what", "input", "--step", "finetune"], "cannot be combined with --what input"),
        (["--what", "step"], "--what step needs --step"),
        (["--step", "finetune", "--variant", "L-3_H-100"], "unknown model variant 'L-3_H-100'"),
        (["--step", "finetune", "--seq", "513"], "--seq 513 exceeds max_position_embeddings 512"),
        (["--step", "pretrain", "--seq", "16", "--predictions", "16"], "must be smaller than"),
        (["--step", "finetune", "--peak-flops", "0"], "argument --peak-flops: must be positive"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, argv, message):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bert_mini.bench: error: ")
    assert message in lines[0]


def test_compare_without_transformers_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    argv = ["--step", "finetune", "--variant", "tiny", "--compare", "--peak-flops", "1e9"]
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--compare needs torch and transformers" in lines[0]
