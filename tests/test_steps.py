"""Step functions: one-step golden values against PyTorch ``transformers``, and 1 vs 8 devices.

The goldens are independent: the same weights are exported to HF format and run in PyTorch,
whose loss, gradient norm and (for fine-tuning) AdamW update must match bert_mini's step.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import bert_mini
from bert_mini import checkpoint_formats, optim, sharding, steps
from bert_mini.model import BertConfig, create_model

CONFIG = BertConfig(
    vocab_size=300,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=80,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,  # goldens compare without dropout
    attention_probs_dropout_prob=0.0,
)
LR = 1e-3


def _batch(
    seed: int, batch: int = 8, seq_len: int = 16, predictions: int = 4
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, seq_len + 1, size=batch)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(5, CONFIG.vocab_size, size=(batch, seq_len)) * mask).astype(np.int32)
    positions = np.stack([rng.choice(int(n), size=predictions, replace=False) for n in lengths])
    teacher = rng.normal(size=(batch, 3)).astype(np.float32) * 2
    return {
        "input_ids": ids,
        "token_type_ids": ((np.arange(seq_len)[None] >= lengths[:, None] // 2) * mask).astype(
            np.int32
        ),
        "attention_mask": mask,
        "label": rng.integers(0, 3, size=batch).astype(np.int32),
        "masked_positions": positions.astype(np.int32),
        "masked_ids": rng.integers(5, CONFIG.vocab_size, size=(batch, predictions)).astype(
            np.int32
        ),
        "masked_weights": np.ones((batch, predictions), np.float32),
        "next_sentence_label": rng.integers(0, 2, size=batch).astype(np.int32),
        "teacher_logits": teacher,
    }


def _torch_inputs(batch):
    return {
        k: torch.tensor(batch[k], dtype=torch.long)
        for k in ("input_ids", "token_type_ids", "attention_mask")
    }


def _one_step(mode: str, head: str, batch, seed: int = 0):
    model = create_model(CONFIG, head, num_labels=3, seed=seed)
    graphdef, params = nnx.split(model)
    optimizer = optim.make_optimizer(
        learning_rate=LR, warmup_steps=0, total_steps=10, params=params, weight_decay=0.01
    )
    state = steps.create_train_state(params, optimizer, seed=0)
    kind = "pretrain" if mode == "pretrain" else "classification"
    step = jax.jit(steps.step_function(kind, mode, graphdef=graphdef, optimizer=optimizer))
    new_state, metrics = step(state, batch)
    return model, new_state, jax.device_get(metrics), graphdef


def _reference(model, tmp_path, cls):
    bert_mini.save_pretrained(model, None, tmp_path / "hf", "hf")
    return cls.from_pretrained(tmp_path / "hf", attn_implementation="eager").train()


def _grad_norm(module: torch.nn.Module) -> float:
    return float(
        torch.sqrt(
            sum((p.grad.double() ** 2).sum() for p in module.parameters() if p.grad is not None)
        )
    )


def _value(pair) -> float:
    total, count = pair
    return float(total) / float(count)


def test_finetune_step_matches_transformers_loss_gradient_and_adamw_update(tmp_path):
    batch = _batch(seed=1)
    model, new_state, metrics, graphdef = _one_step("finetune", "classification", batch)
    reference = _reference(model, tmp_path, transformers.BertForSequenceClassification)
    out = reference(**_torch_inputs(batch), labels=torch.tensor(batch["label"], dtype=torch.long))
    out.loss.backward()
    assert abs(_value(metrics["loss"]) - out.loss.item()) <= 1e-5
    assert abs(_value(metrics["grad_norm"]) - _grad_norm(reference)) <= 1e-5 * _grad_norm(reference)

    # BERT's AdamW in PyTorch: clip at 1.0, eps 1e-6, no decay on biases and LayerNorm.
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    no_decay = [p for n, p in reference.named_parameters() if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in reference.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-6,
    ).step()
    updated = checkpoint_formats.model_tensors(nnx.merge(graphdef, new_state.params), "hf")
    expected = {n: p.detach().numpy() for n, p in reference.named_parameters()}
    for name, value in updated.items():
        np.testing.assert_allclose(value, expected[name], atol=2e-6, err_msg=name)
    assert int(new_state.step) == 1


def test_pretrain_step_matches_transformers_mlm_plus_nsp(tmp_path):
    batch = _batch(seed=2)
    model, _, metrics, _ = _one_step("pretrain", "pretraining", batch)
    reference = _reference(model, tmp_path, transformers.BertForPreTraining)
    labels = np.full(batch["input_ids"].shape, -100)
    np.put_along_axis(labels, batch["masked_positions"], batch["masked_ids"], axis=1)
    out = reference(
        **_torch_inputs(batch),
        labels=torch.tensor(labels),
        next_sentence_label=torch.tensor(batch["next_sentence_label"], dtype=torch.long),
    )
    out.loss.backward()
    assert abs(_value(metrics["loss"]) - out.loss.item()) <= 1e-5
    assert abs(_value(metrics["grad_norm"]) - _grad_norm(reference)) <= 1e-5 * _grad_norm(reference)
    assert 0.0 <= _value(metrics["mlm_accuracy"]) <= 1.0


def test_span_step_matches_transformers_question_answering(tmp_path):
    # No padding: HF embeds [PAD] with padding_idx (no gradient), Google's BERT and bert_mini
    # train it; span logits at padded positions would make that difference visible.
    batch = _batch(seed=6)
    rng = np.random.default_rng(6)
    batch["attention_mask"] = np.ones_like(batch["attention_mask"])
    batch["input_ids"] = rng.integers(5, CONFIG.vocab_size, size=batch["input_ids"].shape).astype(
        np.int32
    )
    batch["start_positions"] = rng.integers(0, 6, size=8).astype(np.int32)
    batch["end_positions"] = batch["start_positions"] + rng.integers(0, 3, size=8).astype(np.int32)
    model = create_model(CONFIG, "span", seed=0)
    graphdef, params = nnx.split(model)
    optimizer = optim.make_optimizer(
        learning_rate=LR, warmup_steps=0, total_steps=10, params=params
    )
    state = steps.create_train_state(params, optimizer, seed=0)
    step = jax.jit(steps.step_function("span", "finetune", graphdef=graphdef, optimizer=optimizer))
    _, metrics = step(state, batch)
    reference = _reference(model, tmp_path, transformers.BertForQuestionAnswering)
    out = reference(
        **_torch_inputs(batch),
        start_positions=torch.tensor(batch["start_positions"], dtype=torch.long),
        end_positions=torch.tensor(batch["end_positions"], dtype=torch.long),
    )
    out.loss.backward()
    metrics = jax.device_get(metrics)
    assert abs(_value(metrics["loss"]) - out.loss.item()) <= 1e-5
    assert abs(_value(metrics["grad_norm"]) - _grad_norm(reference)) <= 1e-5 * _grad_norm(reference)


def test_distill_step_with_cached_logits_matches_soft_cross_entropy(tmp_path):
    batch = _batch(seed=3)
    model, _, metrics, _ = _one_step("distill", "classification", batch)
    reference = _reference(model, tmp_path, transformers.BertForSequenceClassification)
    logits = reference(**_torch_inputs(batch)).logits
    teacher = torch.softmax(torch.tensor(batch["teacher_logits"]), dim=-1)
    loss = -(teacher * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    loss.backward()
    assert abs(_value(metrics["loss"]) - loss.item()) <= 1e-5
    assert abs(_value(metrics["grad_norm"]) - _grad_norm(reference)) <= 1e-5 * _grad_norm(reference)


def test_distill_step_with_frozen_teacher_in_the_step_equals_cached_logits():
    batch = _batch(seed=4)
    teacher = create_model(CONFIG, "classification", num_labels=3, seed=9)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    batch["teacher_logits"] = np.asarray(
        teacher(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
    )
    student = create_model(CONFIG, "classification", num_labels=3, seed=0)
    graphdef, params = nnx.split(student)
    optimizer = optim.make_optimizer(
        learning_rate=LR, warmup_steps=0, total_steps=10, params=params
    )
    state = steps.create_train_state(params, optimizer, seed=0)
    cached = jax.jit(
        steps.step_function("classification", "distill", graphdef=graphdef, optimizer=optimizer)
    )
    live = jax.jit(
        steps.step_function(
            "classification",
            "distill",
            graphdef=graphdef,
            optimizer=optimizer,
            teacher_graphdef=teacher_graphdef,
        )
    )
    _, cached_metrics = cached(state, batch)
    before = jax.tree.map(np.asarray, teacher_params)
    _, live_metrics = live(state, batch, teacher_params)
    np.testing.assert_allclose(
        _value(live_metrics["loss"]), _value(cached_metrics["loss"]), rtol=1e-6
    )
    after = jax.tree.map(np.asarray, teacher_params)  # the teacher is never donated or changed
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_dropout_keys_depend_on_the_step_only():
    config = dataclasses.replace(CONFIG, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = create_model(config, "classification", num_labels=3)
    graphdef, params = nnx.split(model)
    optimizer = optim.make_optimizer(
        learning_rate=LR, warmup_steps=0, total_steps=10, params=params
    )
    step = jax.jit(
        steps.step_function("classification", "finetune", graphdef=graphdef, optimizer=optimizer)
    )
    batch = _batch(seed=5)
    state = steps.create_train_state(params, optimizer, seed=0)
    _, a = step(state, batch)
    _, b = step(state, batch)
    _, c = step(state.replace(step=state.step + 1), batch)
    assert _value(a["loss"]) == _value(b["loss"])
    assert _value(a["loss"]) != _value(c["loss"])


def _run_steps(mode: str, mesh_shape: dict, devices, count: int = 3) -> list[float]:
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    rules = sharding.DEFAULT_RULES
    head = "pretraining" if mode == "pretrain" else "classification"
    config = dataclasses.replace(CONFIG, vocab_size=304)
    graphdef, params = sharding.init_sharded(
        lambda: create_model(config, head, 3, seed=1), mesh, rules
    )
    optimizer = optim.make_optimizer(
        learning_rate=LR, warmup_steps=1, total_steps=10, params=params
    )
    state = jax.jit(functools.partial(steps.create_train_state, optimizer=optimizer, seed=0))(
        params
    )
    kind = "pretrain" if mode == "pretrain" else "classification"
    step = jax.jit(
        steps.step_function(kind, mode, graphdef=graphdef, optimizer=optimizer),
        out_shardings=(jax.tree.map(lambda x: x.sharding, state), None),
        donate_argnums=0,
    )
    losses = []
    for i in range(count):
        batch = _batch(seed=10 + i)
        batch["input_ids"] = np.minimum(batch["input_ids"], 303)
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(_value(jax.device_get(metrics["loss"])))
    return losses


@functools.cache
def _single_device_losses(mode: str) -> tuple[float, ...]:
    return tuple(_run_steps(mode, {"data": 1}, jax.devices()[:1]))


@pytest.mark.parametrize(
    "mode, mesh_shape",
    [
        ("finetune", {"data": 8}),
        ("finetune", {"fsdp": 8}),
        ("finetune", {"data": 2, "tensor": 4}),
        ("pretrain", {"fsdp": 8}),
        ("pretrain", {"data": 2, "fsdp": 2, "tensor": 2}),
    ],
)
def test_one_device_and_eight_devices_give_the_same_losses(mode, mesh_shape):
    losses = _run_steps(mode, mesh_shape, jax.devices())
    np.testing.assert_allclose(
        losses, _single_device_losses(mode), rtol=1e-5, err_msg=str(mesh_shape)
    )
