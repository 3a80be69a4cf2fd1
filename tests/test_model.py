"""The BERT family: size table, shapes, masking, dtypes, logical axes and sharded execution."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_mini import config_lib
from bert_mini.model import BertConfig, BertModel, count_params, create_model, gather_positions

TINY_ODD = BertConfig(
    vocab_size=211,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=100,
    max_position_embeddings=40,
    type_vocab_size=3,
)


def _batch(seed: int = 0, batch: int = 4, seq_len: int = 16, vocab: int = 211):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq_len), dtype=np.int32)
    lengths = rng.integers(3, seq_len + 1, size=batch)
    lengths[0] = seq_len
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    types = ((np.arange(seq_len)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int32)
    return ids, types, mask


def test_size_table_has_24_compact_models_base_and_large():
    compact = [f"L-{n}_H-{h}" for n in (2, 4, 6, 8, 10, 12) for h in (128, 256, 512, 768)]
    assert set(compact) | {"L-24_H-1024"} == set(config_lib.SIZES)
    for name in compact:
        dims = config_lib.SIZES[name]
        assert dims["num_attention_heads"] == dims["hidden_size"] // 64
        assert dims["intermediate_size"] == 4 * dims["hidden_size"]
    assert config_lib.SIZES["L-24_H-1024"]["num_attention_heads"] == 16


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny", "L-2_H-128"),
        ("mini", "L-4_H-256"),
        ("small", "L-4_H-512"),
        ("medium", "L-8_H-512"),
        ("base", "L-12_H-768"),
        ("large", "L-24_H-1024"),
        ("bert-mini", "L-4_H-256"),
        ("uncased_L-4_H-256_A-4", "L-4_H-256"),
        ("google/bert_uncased_L-2_H-128_A-2", "L-2_H-128"),
        ("L-10_H-512", "L-10_H-512"),
    ],
)
def test_variant_names(name, expected):
    assert config_lib.canonical_variant(name) == expected


@pytest.mark.parametrize("name", ["huge", "L-3_H-128", "L-4_H-256_A-8", "L-4_H-100"])
def test_bad_variant_names_are_errors(name):
    with pytest.raises(ValueError, match="variant"):
        config_lib.canonical_variant(name)


@pytest.mark.parametrize(
    "variant, head, expected",
    [
        ("base", None, 109_482_240),  # HF bert-base-uncased BertModel
        ("tiny", None, 4_385_920),  # Google's BERT-Tiny encoder + pooler
        ("mini", None, 11_170_560),
        ("tiny", "pretraining", 4_385_920 + 128 * 128 + 128 + 2 * 128 + 30522 + 2 * 128 + 2),
    ],
)
def test_parameter_counts(variant, head, expected):
    abstract = nnx.eval_shape(lambda: create_model(BertConfig.from_variant(variant), head))
    assert count_params(abstract) == expected


def test_config_validation():
    with pytest.raises(ValueError, match="unknown hidden_act 'swish'"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match=r"my.json: unknown BertConfig key\(s\) \['hiden_size'\]"):
        BertConfig.from_dict({"hiden_size": 4}, source="my.json")
    with pytest.raises(ValueError, match="dtype"):
        BertConfig(dtype="float64")


def test_output_shapes_for_every_head():
    ids, types, mask = _batch()
    for head, fields in [
        (None, {}),
        ("pretraining", {"mlm_logits": (4, 16, 211), "nsp_logits": (4, 2)}),
        ("classification", {"logits": (4, 5)}),
        ("regression", {"logits": (4, 1)}),
        ("span", {"start_logits": (4, 16), "end_logits": (4, 16)}),
    ]:
        model = create_model(TINY_ODD, head, num_labels=5)
        out = model(ids, types, mask)
        assert out.sequence_output.shape == (4, 16, 48)
        assert out.pooled_output.shape == (4, 48)
        for field in ("mlm_logits", "nsp_logits", "logits", "start_logits", "end_logits"):
            value = getattr(out, field)
            if field in fields:
                assert value.shape == fields[field], (head, field)
                assert value.dtype == jnp.float32
            else:
                assert value is None, (head, field)


def test_mlm_logits_only_at_masked_positions_match_full_logits():
    model = create_model(TINY_ODD, "mlm", seed=3)
    ids, types, mask = _batch(seed=1)
    positions = np.array([[1, 5, 0], [2, 2, 7], [0, 1, 2], [9, 3, 4]], dtype=np.int32)
    full = model(ids, types, mask).mlm_logits
    at_masks = model(ids, types, mask, masked_positions=positions).mlm_logits
    assert at_masks.shape == (4, 3, 211)
    np.testing.assert_allclose(at_masks, gather_positions(full, positions), atol=1e-6)
    np.testing.assert_allclose(at_masks[3, 0], full[3, 9], atol=1e-6)


def test_padding_does_not_change_real_positions():
    model = create_model(TINY_ODD, "classification", seed=1)
    ids, types, mask = _batch(seed=2, seq_len=12)
    pad = ((0, 0), (0, 9))
    short = model(ids, types, mask)
    padded = model(np.pad(ids, pad), np.pad(types, pad), np.pad(mask, pad))
    real = mask[..., None] > 0
    np.testing.assert_allclose(
        np.where(real, padded.sequence_output[:, :12], 0),
        np.where(real, short.sequence_output, 0),
        atol=2e-6,
    )
    np.testing.assert_allclose(padded.logits, short.logits, atol=2e-6)


def test_dropout_is_keyed_and_off_by_default():
    model = create_model(TINY_ODD, "classification")
    ids, types, mask = _batch()
    eval_a = model(ids, types, mask).logits
    eval_b = model(ids, types, mask).logits
    train_a = model(ids, types, mask, deterministic=False, rngs=nnx.Rngs(dropout=7)).logits
    train_b = model(ids, types, mask, deterministic=False, rngs=nnx.Rngs(dropout=7)).logits
    train_c = model(ids, types, mask, deterministic=False, rngs=nnx.Rngs(dropout=8)).logits
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_c)


def test_model_state_holds_only_parameters():
    graphdef, params, rest = nnx.split(create_model(TINY_ODD, "pretraining"), nnx.Param, ...)
    assert jax.tree.leaves(rest) == []
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_too_long_input_and_bad_shapes_are_errors():
    model = create_model(TINY_ODD)
    with pytest.raises(ValueError, match="input length 41 exceeds max_position_embeddings 40"):
        model(np.ones((1, 41), np.int32))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(np.ones((2, 8), np.int32), attention_mask=np.ones((2, 7), np.int32))
    with pytest.raises(ValueError, match="unknown head"):
        create_model(TINY_ODD, "ner")


AXIS_NAMES = {"vocab", "embed", "heads", "mlp", None}


def test_every_parameter_has_logical_axis_names():
    model = create_model(TINY_ODD, "pretraining")
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None, path
        assert len(axes) == variable.get_value().ndim, path
        assert set(axes) <= AXIS_NAMES, path
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["layers"][0]["intermediate"]["kernel"].get_value() == PartitionSpec("embed", "mlp")
    assert specs["embeddings"]["word_embeddings"]["embedding"].get_value() == PartitionSpec(
        "vocab", "embed"
    )


def _mesh_sharding(spec: PartitionSpec, rules: dict, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*(rules.get(axis) for axis in spec)))


def test_sharded_forward_on_8_devices_matches_single_device():
    assert jax.device_count() == 8, "conftest must set 8 fake CPU devices"
    config = dataclasses.replace(TINY_ODD, vocab_size=208)  # vocab divisible by the tensor axis
    model = create_model(config, "pretraining", seed=4)
    ids, types, mask = _batch(seed=5, batch=8, vocab=208)
    expected = model(ids, types, mask)

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    rules = {"vocab": "tensor", "heads": "tensor", "mlp": "tensor", "embed": None}
    graphdef, params = nnx.split(model)
    specs = nnx.get_partition_spec(params)
    shardings = jax.tree.map(lambda spec: _mesh_sharding(spec, rules, mesh), specs)
    params = jax.device_put(params, shardings)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data", None))

    @jax.jit
    def forward(params, ids, types, mask):
        return nnx.merge(graphdef, params)(ids, types, mask)

    kernel = params["layers"][0]["intermediate"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8
    got = forward(params, *(jax.device_put(x, batch_sharding) for x in (ids, types, mask)))
    for field in ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-5
        )


def test_bfloat16_compute_keeps_float32_params_and_logits():
    config = dataclasses.replace(TINY_ODD, dtype="bfloat16")
    model = create_model(config, "pretraining")
    ids, types, mask = _batch()
    out = model(ids, types, mask)
    assert out.sequence_output.dtype == jnp.bfloat16
    assert out.mlm_logits.dtype == jnp.float32 and out.nsp_logits.dtype == jnp.float32
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_jitted_functional_forward_matches_eager():
    model = create_model(TINY_ODD, "span")
    ids, types, mask = _batch(seed=9)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, *batch: nnx.merge(graphdef, p)(*batch))
    np.testing.assert_allclose(
        forward(params, ids, types, mask).start_logits,
        model(ids, types, mask).start_logits,
        atol=1e-5,
    )


def test_model_is_an_nnx_module():
    assert issubclass(BertModel, nnx.Module)
