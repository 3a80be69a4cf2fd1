"""Checkpoint import and export, checked against PyTorch ``transformers`` as the reference.

- the real all-MiniLM-L6-v2 checkpoint: sequence and pooled outputs on real GLUE sentences/pairs;
- random odd-shaped ``BertForPreTraining`` models: MLM and NSP logits, for each activation;
- Google TF checkpoints written here with Google's own variable names (not bert_mini's table);
- exports that ``transformers`` loads; round trips through every format change no value;
- bad input gives one clear error naming the file or tensor, and never half-writes a checkpoint.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import bert_mini
from bert_mini import checkpoint_formats
from bert_mini.checkpoints import CheckpointError
from bert_mini.model import BertConfig, create_model

TOL = 1e-4


def _torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.long) for name, value in batch.items()}


def _ours(model, batch: dict[str, np.ndarray], **kwargs):
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], **kwargs)


def _max_diff(ours, reference: torch.Tensor) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - reference.detach().numpy()).max())


def _read_tsv(path: pathlib.Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


@pytest.fixture(scope="module")
def real_batches(data_dir) -> list[tuple[list[str], list[str] | None]]:
    """64 SST-2 dev sentences and 64 MRPC dev pairs, sorted so each batch mixes lengths."""
    sst2 = [row[0] for row in _read_tsv(data_dir / "glue/SST-2/dev.tsv")][:64]
    mrpc = _read_tsv(data_dir / "glue/MRPC/dev.tsv")[:64]
    batches = []
    for start in range(0, 64, 16):
        batches.append((sst2[start : start + 16], None))
        rows = mrpc[start : start + 16]
        batches.append(([r[3] for r in rows], [r[4] for r in rows]))
    return batches


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    model, tokenizer = bert_mini.from_pretrained(minilm_dir)
    reference = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager")
    return model, tokenizer, reference.eval()


def test_minilm_matches_transformers_on_real_sentences_and_pairs(minilm, real_batches):
    model, tokenizer, reference = minilm
    sequence_diff = pooled_diff = 0.0
    examples = padded_rows = 0
    for texts, pairs in real_batches:
        batch = tokenizer(texts, pairs, max_length=128, padding="longest")
        assert batch["input_ids"].shape[1] <= 128
        padded_rows += int((batch["attention_mask"] == 0).any(axis=1).sum())
        examples += len(texts)
        out = _ours(model, batch)
        with torch.no_grad():
            ref = reference(**_torch_batch(batch))
        real = batch["attention_mask"][..., None] > 0
        sequence_diff = max(
            sequence_diff,
            float(
                np.abs(np.where(real, out.sequence_output - ref.last_hidden_state.numpy(), 0)).max()
            ),
        )
        pooled_diff = max(pooled_diff, _max_diff(out.pooled_output, ref.pooler_output))
    assert examples == 128 and padded_rows > 64
    assert sequence_diff <= TOL, sequence_diff
    assert pooled_diff <= TOL, pooled_diff


def test_minilm_bfloat16_compute_stays_close_to_float32(minilm_dir, minilm, real_batches):
    model32, tokenizer, _ = minilm
    model16, _ = bert_mini.from_pretrained(minilm_dir, dtype="bfloat16")
    texts, pairs = real_batches[1]
    batch = tokenizer(texts, pairs, max_length=128, padding="longest")
    out32, out16 = _ours(model32, batch), _ours(model16, batch)
    real = batch["attention_mask"] > 0
    seq32 = np.asarray(out32.sequence_output)[real]
    seq16 = np.asarray(out16.sequence_output, np.float32)[real]
    cosine = np.sum(seq32 * seq16, -1) / (
        np.linalg.norm(seq32, axis=-1) * np.linalg.norm(seq16, axis=-1)
    )
    # Stated tolerance for bf16 compute (8-bit mantissa, 6 layers): per-token cosine >= 0.995,
    # mean absolute error <= 0.05 on hidden states of scale ~0.5, pooled max error <= 0.05.
    assert cosine.min() >= 0.995, cosine.min()
    assert np.abs(seq32 - seq16).mean() <= 0.05
    assert (
        np.abs(np.asarray(out32.pooled_output) - np.asarray(out16.pooled_output, np.float32)).max()
        <= 0.05
    )
    assert out16.sequence_output.dtype == jax.numpy.bfloat16


# ----------------------------------------------------------------------------- odd shapes


ODD_SHAPE = dict(
    vocab_size=1000,
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=200,
    max_position_embeddings=64,
    type_vocab_size=3,
    layer_norm_eps=1e-7,
)


def _odd_hf_config(hidden_act: str = "gelu", **overrides) -> transformers.BertConfig:
    values = dict(
        ODD_SHAPE, hidden_act=hidden_act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return transformers.BertConfig(**{**values, **overrides})


def _our_odd_config(**overrides) -> BertConfig:
    return BertConfig(**{**ODD_SHAPE, **overrides})


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (HF inits biases to 0 and LayerNorm to 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _write_vocab(directory: pathlib.Path, vocab_path: pathlib.Path, size: int = 1000) -> None:
    lines = vocab_path.read_text(encoding="utf-8").splitlines()[:size]
    (directory / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _random_batch(seed: int, batch: int = 5, seq_len: int = 24, vocab: int = 1000):
    rng = np.random.default_rng(seed)
    ids = rng.integers(104, vocab, size=(batch, seq_len))
    lengths = rng.integers(4, seq_len + 1, size=batch)
    lengths[0] = seq_len
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int64)
    types = ((np.arange(seq_len)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int64)
    types[1] = np.where(mask[1] > 0, 2, 0)  # the third token type of the odd config
    return {"input_ids": ids * mask, "token_type_ids": types, "attention_mask": mask}


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_random_odd_shaped_pretraining_model_matches_transformers(tmp_path, vocab_path, hidden_act):
    reference = _randomise(
        transformers.BertForPreTraining(_odd_hf_config(hidden_act)), seed=len(hidden_act)
    )
    reference.save_pretrained(tmp_path)
    _write_vocab(tmp_path, vocab_path)
    model, _ = bert_mini.from_pretrained(tmp_path, head="pretraining")
    assert (
        model.config.hidden_act
        == {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[hidden_act]
    )
    assert model.config.layer_norm_eps == 1e-7
    batch = _random_batch(seed=1)
    with torch.no_grad():
        ref = reference(**_torch_batch(batch))
    out = _ours(model, batch)
    assert _max_diff(out.mlm_logits, ref.prediction_logits) <= TOL
    assert _max_diff(out.nsp_logits, ref.seq_relationship_logits) <= TOL

    positions = np.array([[0, 3, 7], [1, 1, 2], [5, 9, 11], [2, 3, 4], [23, 0, 1]])
    at_masks = _ours(model, batch, masked_positions=positions).mlm_logits
    expected = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], axis=1)
    assert float(np.abs(np.asarray(at_masks) - expected).max()) <= TOL


# ----------------------------------------------------------------------------- Google TF


def _google_names(layers: int) -> dict[str, tuple[str, bool]]:
    """Google TF variable name -> (HF parameter name, transpose), from modeling.py's scopes."""
    names = {
        "bert/embeddings/word_embeddings": ("bert.embeddings.word_embeddings.weight", False),
        "bert/embeddings/position_embeddings": (
            "bert.embeddings.position_embeddings.weight",
            False,
        ),
        "bert/embeddings/token_type_embeddings": (
            "bert.embeddings.token_type_embeddings.weight",
            False,
        ),
        "bert/embeddings/LayerNorm/gamma": ("bert.embeddings.LayerNorm.weight", False),
        "bert/embeddings/LayerNorm/beta": ("bert.embeddings.LayerNorm.bias", False),
        "bert/pooler/dense/kernel": ("bert.pooler.dense.weight", True),
        "bert/pooler/dense/bias": ("bert.pooler.dense.bias", False),
    }
    for i in range(layers):
        tf, hf = f"bert/encoder/layer_{i}", f"bert.encoder.layer.{i}"
        for scope_tf, scope_hf in [
            ("attention/self/query", "attention.self.query"),
            ("attention/self/key", "attention.self.key"),
            ("attention/self/value", "attention.self.value"),
            ("attention/output/dense", "attention.output.dense"),
            ("intermediate/dense", "intermediate.dense"),
            ("output/dense", "output.dense"),
        ]:
            names[f"{tf}/{scope_tf}/kernel"] = (f"{hf}.{scope_hf}.weight", True)
            names[f"{tf}/{scope_tf}/bias"] = (f"{hf}.{scope_hf}.bias", False)
        for scope_tf, scope_hf in [
            ("attention/output/LayerNorm", "attention.output.LayerNorm"),
            ("output/LayerNorm", "output.LayerNorm"),
        ]:
            names[f"{tf}/{scope_tf}/gamma"] = (f"{hf}.{scope_hf}.weight", False)
            names[f"{tf}/{scope_tf}/beta"] = (f"{hf}.{scope_hf}.bias", False)
    return names


def _write_google_checkpoint(directory: pathlib.Path, tensors: dict[str, np.ndarray], config: dict):
    """Writes like Google's TF1 code: a name-based Saver checkpoint plus bert_config.json."""
    import tensorflow as tf

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bert_config.json").write_text(json.dumps(config))
    variables = {
        name: tf.Variable(value, name=name.replace("/", "_")) for name, value in tensors.items()
    }
    tf.compat.v1.train.Saver(var_list=variables).save(None, str(directory / "bert_model.ckpt"))


def _google_config(hf_config: transformers.BertConfig) -> dict:
    keys = [
        "attention_probs_dropout_prob", "hidden_dropout_prob", "hidden_size", "initializer_range",
        "intermediate_size", "max_position_embeddings", "num_attention_heads",
        "num_hidden_layers", "type_vocab_size", "vocab_size",
    ]  # fmt: skip
    return {"hidden_act": "gelu", **{key: getattr(hf_config, key) for key in keys}}


def test_google_tf_pretraining_checkpoint_loads_and_matches(tmp_path, vocab_path):
    # Google's BERT computes the tanh GELU and LayerNorm eps 1e-12: the reference must too.
    hf_config = _odd_hf_config("gelu_new", layer_norm_eps=1e-12)
    reference = _randomise(transformers.BertForPreTraining(hf_config), seed=11)
    params = {name: p.detach().numpy() for name, p in reference.named_parameters()}
    params["cls.predictions.bias"] = reference.cls.predictions.bias.detach().numpy()
    tensors = {
        tf_name: (params[hf].T if transpose else params[hf]).copy()
        for tf_name, (hf, transpose) in _google_names(3).items()
    }
    tensors.update(
        {
            "cls/predictions/transform/dense/kernel": params[
                "cls.predictions.transform.dense.weight"
            ].T.copy(),
            "cls/predictions/transform/dense/bias": params["cls.predictions.transform.dense.bias"],
            "cls/predictions/transform/LayerNorm/gamma": params[
                "cls.predictions.transform.LayerNorm.weight"
            ],
            "cls/predictions/transform/LayerNorm/beta": params[
                "cls.predictions.transform.LayerNorm.bias"
            ],
            "cls/predictions/output_bias": params["cls.predictions.bias"],
            "cls/seq_relationship/output_weights": params[
                "cls.seq_relationship.weight"
            ],  # [out, in]
            "cls/seq_relationship/output_bias": params["cls.seq_relationship.bias"],
            # Optimizer slots and the step counter of a pre-training checkpoint are not parameters.
            "bert/pooler/dense/kernel/adam_m": np.zeros((96, 96), np.float32),
            "bert/pooler/dense/kernel/adam_v": np.zeros((96, 96), np.float32),
            "global_step": np.array(1000, np.int64),
        }
    )
    directory = tmp_path / "uncased_L-3_H-96_A-3"
    _write_google_checkpoint(directory, tensors, _google_config(hf_config))
    _write_vocab(directory, vocab_path)

    model, _, report = bert_mini.load_pretrained(directory, head="pretraining")
    assert model.config.hidden_act == "gelu_tanh"
    assert set(report.skipped) == {
        "global_step", "bert/pooler/dense/kernel/adam_m", "bert/pooler/dense/kernel/adam_v"
    }  # fmt: skip
    batch = _random_batch(seed=3)
    with torch.no_grad():
        ref = reference(**_torch_batch(batch))
    out = _ours(model, batch)
    assert _max_diff(out.mlm_logits, ref.prediction_logits) <= TOL
    assert _max_diff(out.nsp_logits, ref.seq_relationship_logits) <= TOL
    # The prefix path (as Google's scripts pass it) works too.
    by_prefix, _ = bert_mini.from_pretrained(directory / "bert_model.ckpt", head="pretraining")
    np.testing.assert_array_equal(_ours(by_prefix, batch).nsp_logits, out.nsp_logits)


def test_google_tf_classifier_checkpoint_loads_and_matches(tmp_path, vocab_path):
    hf_config = _odd_hf_config("gelu_new", layer_norm_eps=1e-12, num_labels=3)
    reference = _randomise(transformers.BertForSequenceClassification(hf_config), seed=5)
    params = {name: p.detach().numpy() for name, p in reference.named_parameters()}
    tensors = {
        tf_name: (params[hf].T if transpose else params[hf]).copy()
        for tf_name, (hf, transpose) in _google_names(3).items()
    }
    tensors["output_weights"] = params["classifier.weight"]  # run_classifier.py: [labels, hidden]
    tensors["output_bias"] = params["classifier.bias"]
    _write_google_checkpoint(tmp_path / "ckpt", tensors, _google_config(hf_config))
    _write_vocab(tmp_path / "ckpt", vocab_path)
    model, _ = bert_mini.from_pretrained(tmp_path / "ckpt", head="classification")
    assert model.num_labels == 3
    batch = _random_batch(seed=4)
    with torch.no_grad():
        ref = reference(**_torch_batch(batch))
    assert _max_diff(_ours(model, batch).logits, ref.logits) <= TOL


# ----------------------------------------------------------------------------- export


def test_hf_export_loads_in_transformers_masked_lm(tmp_path, vocab_path):
    model = create_model(_our_odd_config(), "mlm", seed=2)
    tokenizer = bert_mini.BertTokenizer(_vocab_file(tmp_path, vocab_path))
    bert_mini.save_pretrained(model, tokenizer, tmp_path / "hf", "hf")
    reference, info = transformers.BertForMaskedLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) <= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    batch = _random_batch(seed=6)
    with torch.no_grad():
        ref = reference.eval()(**_torch_batch(batch))
    assert _max_diff(_ours(model, batch).mlm_logits, ref.logits) <= TOL
    fast = transformers.BertTokenizerFast.from_pretrained(tmp_path / "hf")
    assert fast("[MASK] hello")["input_ids"] == [101, 103, 100, 102]  # 1000-token vocab: no "hello"
    assert fast("[MASK] hello")["input_ids"] == list(
        tokenizer("[MASK] hello", padding="longest")["input_ids"][0]
    )


def test_hf_export_of_minilm_classifier_loads_in_transformers(tmp_path, minilm_dir, real_batches):
    model, tokenizer, report = bert_mini.load_pretrained(
        minilm_dir, head="classification", num_labels=3, new_head=True
    )
    assert report.new_groups == ["classifier"]
    bert_mini.save_pretrained(model, tokenizer, tmp_path / "cls", "hf")
    reference, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "cls", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    texts, pairs = real_batches[1]
    batch = tokenizer(texts, pairs, max_length=64, padding="longest")
    with torch.no_grad():
        ref = reference.eval()(**_torch_batch(batch))
    assert ref.logits.shape == (16, 3)
    assert _max_diff(_ours(model, batch).logits, ref.logits) <= TOL


def _vocab_file(tmp_path: pathlib.Path, vocab_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "vocab"
    directory.mkdir(exist_ok=True)
    _write_vocab(directory, vocab_path)
    return directory / "vocab.txt"


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("fmt", ["hf", "tf", "bert_mini"])
@pytest.mark.parametrize(
    "head, act",
    [
        ("pretraining", "gelu"),
        ("classification", "gelu_tanh"),
        ("regression", "relu"),
        ("span", "gelu"),
    ],
)
def test_round_trip_changes_no_value(tmp_path, vocab_path, fmt, head, act):
    model = create_model(_our_odd_config(hidden_act=act), head, num_labels=4, seed=9)
    state = nnx.state(model, nnx.Param)  # every tensor random, so a swap would show
    noise = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), state)
    nnx.update(model, noise)
    tokenizer = bert_mini.BertTokenizer(_vocab_file(tmp_path, vocab_path))
    bert_mini.save_pretrained(model, tokenizer, tmp_path / fmt, fmt)
    loaded, loaded_tokenizer = bert_mini.from_pretrained(tmp_path / fmt, head="auto")
    assert loaded.head == head and loaded.num_labels == model.num_labels
    assert loaded.config == model.config
    assert loaded_tokenizer.vocab == tokenizer.vocab
    before, after = _params(model), _params(loaded)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_convert_cli_round_trip(tmp_path, minilm_dir):
    command = [sys.executable, "-m", "bert_mini.convert", "--src", str(minilm_dir)]
    done = subprocess.run(
        [*command, "--dst", str(tmp_path / "tf"), "--format", "tf"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote tf checkpoint" in done.stdout and "22,713,216 parameters" in done.stdout
    assert (tmp_path / "tf" / "bert_model.ckpt.index").is_file()
    from bert_mini import convert

    assert (
        convert.main(
            ["--src", str(tmp_path / "tf"), "--dst", str(tmp_path / "bm"), "--format", "bert_mini"]
        )
        == 0
    )
    original, _ = bert_mini.from_pretrained(minilm_dir)
    converted, _ = bert_mini.from_pretrained(tmp_path / "bm")
    for name, value in _params(original).items():
        np.testing.assert_array_equal(_params(converted)[name], value, err_msg=name)


def test_convert_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from bert_mini import convert

    code = convert.main(
        ["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "x"), "--format", "hf"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "checkpoint not found" in err and "missing" in err
    help_text = convert.build_parser().format_help()
    assert "--new-head" in help_text and "--drop-heads" in help_text and "--overwrite" in help_text


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def odd_hf_dir(tmp_path, vocab_path) -> pathlib.Path:
    directory = tmp_path / "odd"
    _randomise(transformers.BertForPreTraining(_odd_hf_config()), seed=1).save_pretrained(directory)
    _write_vocab(directory, vocab_path)
    return directory


def _edit_json(path: pathlib.Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_tensors(directory: pathlib.Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_checkpoint_and_missing_weights(tmp_path, odd_hf_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        bert_mini.from_pretrained(tmp_path / "nowhere")
    (odd_hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*odd: expected model.safetensors"):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_missing_vocab_is_named(odd_hf_dir):
    (odd_hf_dir / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"odd/vocab.txt"):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_vocab_size_that_does_not_match_embeddings(odd_hf_dir, vocab_path):
    _edit_json(odd_hf_dir / "config.json", vocab_size=999)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'embeddings.word_embeddings.weight' has shape \(1000, 96\), but config.json implies \(999, 96\)",
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")
    _edit_json(odd_hf_dir / "config.json", vocab_size=1000)
    _write_vocab(odd_hf_dir, vocab_path, size=1200)
    with pytest.raises(
        CheckpointError, match=r"vocab.txt: 1200 tokens, but .*config.json has vocab_size 1000"
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_unknown_activation_names_the_config(odd_hf_dir):
    _edit_json(odd_hf_dir / "config.json", hidden_act="swish")
    with pytest.raises(CheckpointError, match=r"odd/config.json: unknown hidden_act 'swish'"):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_tensor_of_wrong_shape_is_named(odd_hf_dir):
    name = "bert.encoder.layer.1.attention.self.query.weight"
    _edit_tensors(odd_hf_dir, lambda t: t.update({name: np.zeros((96, 95), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'encoder.layer.1.attention.self.query.weight' has shape \(96, 95\)",
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_unmapped_and_missing_tensors_are_named(odd_hf_dir):
    _edit_tensors(
        odd_hf_dir,
        lambda t: t.update({"bert.encoder.layer.1.adapter.weight": np.zeros(3, np.float32)}),
    )
    with pytest.raises(
        CheckpointError, match=r"unused tensor\(s\) 'encoder.layer.1.adapter.weight'$"
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")
    _edit_tensors(
        odd_hf_dir,
        lambda t: [
            t.pop("bert.encoder.layer.1.adapter.weight"),
            t.pop("bert.encoder.layer.2.output.dense.bias"),
        ],
    )
    with pytest.raises(
        CheckpointError, match=r"missing encoder tensor\(s\) 'encoder.layer.2.output.dense.bias'"
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_heads_are_created_or_dropped_only_when_asked(odd_hf_dir):
    with pytest.raises(
        CheckpointError,
        match=r"missing classifier tensor\(s\) 'classifier.weight', 'classifier.bias'; pass new_head=True",
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="classification")
    with pytest.raises(
        CheckpointError, match="unused tensor.*cls.predictions.*pass drop_heads=True"
    ):
        bert_mini.from_pretrained(odd_hf_dir, head="classification", new_head=True)
    model, _, report = bert_mini.load_pretrained(
        odd_hf_dir, head="classification", num_labels=3, new_head=True, drop_heads=True
    )
    assert report.new_groups == ["classifier"] and report.dropped_groups == ["mlm", "nsp"]
    assert model.num_labels == 3
    model, _, report = bert_mini.load_pretrained(odd_hf_dir, head="mlm", drop_heads=True)
    assert report.dropped_groups == ["nsp"] and report.new_groups == []


def test_untied_decoder_is_rejected(odd_hf_dir):
    def untie(tensors):
        tensors["cls.predictions.decoder.weight"] = (
            tensors["bert.embeddings.word_embeddings.weight"] + 1
        )

    _edit_tensors(odd_hf_dir, untie)
    with pytest.raises(CheckpointError, match="'cls.predictions.decoder.weight' is not tied"):
        bert_mini.from_pretrained(odd_hf_dir, head="pretraining")


def test_malformed_config_json_names_file_and_line(odd_hf_dir):
    (odd_hf_dir / "config.json").write_text('{\n  "hidden_size": 96,\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"odd/config.json:3: invalid JSON"):
        bert_mini.from_pretrained(odd_hf_dir)


def test_failed_export_leaves_existing_checkpoint_intact(tmp_path, odd_hf_dir, monkeypatch):
    model, tokenizer = bert_mini.from_pretrained(odd_hf_dir, head="pretraining")
    dst = tmp_path / "out"
    bert_mini.save_pretrained(model, tokenizer, dst, "hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(FileExistsError, match="destination exists"):
        bert_mini.save_pretrained(model, tokenizer, dst, "hf")

    def crash_midway(model, directory):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setitem(checkpoint_formats.WRITERS, "hf", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        bert_mini.save_pretrained(model, tokenizer, dst, "hf", overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "out"]


def test_copy_of_real_checkpoint_dir_is_not_modified(tmp_path, minilm_dir):
    copy = tmp_path / "minilm"
    shutil.copytree(minilm_dir, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*")}
    bert_mini.from_pretrained(copy)
    assert {p.name: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


def test_hf_masked_lm_without_pooler_needs_new_head(tmp_path, vocab_path, caplog):
    reference = _randomise(transformers.BertForMaskedLM(_odd_hf_config()), seed=21)
    reference.save_pretrained(tmp_path)
    _write_vocab(tmp_path, vocab_path)
    with pytest.raises(
        CheckpointError,
        match=r"missing pooler tensor\(s\) 'pooler.dense.weight', 'pooler.dense.bias'; pass new_head=True",
    ):
        bert_mini.from_pretrained(tmp_path, head="mlm")
    with caplog.at_level("WARNING", logger="bert_mini"):
        model, _ = bert_mini.from_pretrained(tmp_path, head="mlm", new_head=True)
    assert "created fresh (random init): pooler" in caplog.text
    batch = _random_batch(seed=8)
    with torch.no_grad():
        ref = reference(**_torch_batch(batch))
    assert _max_diff(_ours(model, batch).mlm_logits, ref.logits) <= TOL


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hf_sequence_classifier_from_transformers_matches(tmp_path, vocab_path, weights_file):
    reference = _randomise(
        transformers.BertForSequenceClassification(_odd_hf_config(num_labels=4)), seed=22
    )
    reference.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    _write_vocab(tmp_path, vocab_path)
    model, _, report = bert_mini.load_pretrained(tmp_path, head="auto")
    assert report.head == "classification" and model.num_labels == 4
    assert report.source.endswith(weights_file)
    batch = _random_batch(seed=9)
    with torch.no_grad():
        ref = reference(**_torch_batch(batch))
    assert _max_diff(_ours(model, batch).logits, ref.logits) <= TOL
    with pytest.raises(
        CheckpointError, match=r"tensor 'classifier.bias' has 4 labels, but 3 were asked for"
    ):
        bert_mini.from_pretrained(tmp_path, head="classification", num_labels=3)
