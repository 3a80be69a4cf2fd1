"""Strict import and export of BERT checkpoints: Google TF, Hugging Face and bert_mini's own.

One table (``tensor_rules``) names every parameter three ways: bert_mini's NNX path, the Hugging
Face name and Google's TF variable name, with the layout change between them (as t5x's
checkpoint importer does). Import reads a checkpoint into ``{source name: array}``, then walks the
table: a missing, mis-shaped or left-over tensor is an error that names it and the file. A head
the source lacks is created fresh only with ``new_head=True``; a head the caller did not ask for
is dropped only with ``drop_heads=True``; both are reported.

Layouts: Flax kernels and Google TF kernels are [in, out]; PyTorch ``Linear`` weights are
[out, in]; Google's ``output_weights`` of the NSP, classifier and SQuAD heads are [out, in] too.

Activation: Google's TF BERT computes the tanh GELU although its configs say ``gelu``, while HF's
``gelu`` is the exact erf form. Import honours the source; export writes what the target reads
back the same way (``gelu_new`` for HF; for TF a ``bert_mini_hidden_act`` key that keeps an erf
model erf, which Google's code ignores).
"""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax import nnx

from bert_mini.model import HEAD_CHOICES, BertConfig, BertModel, create_model
from bert_mini.tokenization import BertTokenizer

FORMATS = ("hf", "tf", "bert_mini")
BERT_MINI_MARKER = "bert_mini.json"
BERT_MINI_FORMAT_VERSION = 1
TF_CHECKPOINT_NAME = "bert_model.ckpt"

# Tensors that are not parameters: HF buffers, Google's optimizer slots and step counter.
_HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_TF_NON_PARAMS_SUFFIXES = ("/adam_m", "/adam_v")
_TF_NON_PARAMS = ("global_step", "_CHECKPOINTABLE_OBJECT_GRAPH")

_HF_ACT_TO_OURS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "relu": "relu",
}
_OURS_TO_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_GOOGLE_ACT_TO_OURS = {"gelu": "gelu_tanh", "relu": "relu"}
_OURS_TO_GOOGLE_ACT = {"gelu": "gelu", "gelu_tanh": "gelu", "relu": "relu"}

_HF_ARCHITECTURES = {
    None: "BertModel",
    "mlm": "BertForMaskedLM",
    "pretraining": "BertForPreTraining",
    "classification": "BertForSequenceClassification",
    "regression": "BertForSequenceClassification",
    "span": "BertForQuestionAnswering",
}
# Config keys that describe only the BERT architecture we build, or nothing architectural.
_GOOGLE_KNOWN_EXTRAS = {
    "directionality",
    "pooler_fc_size",
    "pooler_num_attention_heads",
    "pooler_num_fc_layers",
    "pooler_size_per_head",
    "pooler_type",
    "bert_mini_hidden_act",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One parameter under its three names. ``layout`` says how to turn a source array into ours.

    ``same``: identical everywhere; ``linear``: HF is transposed ([out, in]);
    ``out_weights``: HF and TF are both transposed (Google's head ``output_weights``).
    """

    ours: str
    hf: str
    tf: str
    layout: str
    group: str


def _linear_rules(ours: str, hf: str, tf: str, group: str) -> list[TensorRule]:
    return [
        TensorRule(f"{ours}/kernel", f"{hf}.weight", f"{tf}/kernel", "linear", group),
        TensorRule(f"{ours}/bias", f"{hf}.bias", f"{tf}/bias", "same", group),
    ]


def _layer_norm_rules(ours: str, hf: str, tf: str, group: str) -> list[TensorRule]:
    return [
        TensorRule(f"{ours}/scale", f"{hf}.weight", f"{tf}/gamma", "same", group),
        TensorRule(f"{ours}/bias", f"{hf}.bias", f"{tf}/beta", "same", group),
    ]


def _output_weights_rules(ours: str, hf: str, tf: str, group: str) -> list[TensorRule]:
    return [
        TensorRule(f"{ours}/kernel", f"{hf}.weight", f"{tf}output_weights", "out_weights", group),
        TensorRule(f"{ours}/bias", f"{hf}.bias", f"{tf}output_bias", "same", group),
    ]


def tensor_rules(num_layers: int, groups: tuple[str, ...]) -> list[TensorRule]:
    """Every parameter of an encoder with ``num_layers`` layers and the named head ``groups``."""
    rules = []
    for kind in ("word", "position", "token_type"):
        rules.append(
            TensorRule(
                f"embeddings/{kind}_embeddings/embedding",
                f"embeddings.{kind}_embeddings.weight",
                f"bert/embeddings/{kind}_embeddings",
                "same",
                "encoder",
            )
        )
    rules += _layer_norm_rules(
        "embeddings/layer_norm", "embeddings.LayerNorm", "bert/embeddings/LayerNorm", "encoder"
    )
    for i in range(num_layers):
        ours, hf, tf = f"layers/{i}", f"encoder.layer.{i}", f"bert/encoder/layer_{i}"
        for proj in ("query", "key", "value"):
            rules += _linear_rules(
                f"{ours}/attention/{proj}",
                f"{hf}.attention.self.{proj}",
                f"{tf}/attention/self/{proj}",
                "encoder",
            )
        rules += _linear_rules(
            f"{ours}/attention/output",
            f"{hf}.attention.output.dense",
            f"{tf}/attention/output/dense",
            "encoder",
        )
        rules += _layer_norm_rules(
            f"{ours}/attention/layer_norm",
            f"{hf}.attention.output.LayerNorm",
            f"{tf}/attention/output/LayerNorm",
            "encoder",
        )
        rules += _linear_rules(
            f"{ours}/intermediate",
            f"{hf}.intermediate.dense",
            f"{tf}/intermediate/dense",
            "encoder",
        )
        rules += _linear_rules(
            f"{ours}/output", f"{hf}.output.dense", f"{tf}/output/dense", "encoder"
        )
        rules += _layer_norm_rules(
            f"{ours}/output_layer_norm",
            f"{hf}.output.LayerNorm",
            f"{tf}/output/LayerNorm",
            "encoder",
        )
    rules += _linear_rules("pooler", "pooler.dense", "bert/pooler/dense", "pooler")
    if "mlm" in groups:
        rules += _linear_rules(
            "mlm_head/transform",
            "cls.predictions.transform.dense",
            "cls/predictions/transform/dense",
            "mlm",
        )
        rules += _layer_norm_rules(
            "mlm_head/layer_norm",
            "cls.predictions.transform.LayerNorm",
            "cls/predictions/transform/LayerNorm",
            "mlm",
        )
        rules.append(
            TensorRule(
                "mlm_head/bias",
                "cls.predictions.bias",
                "cls/predictions/output_bias",
                "same",
                "mlm",
            )
        )
    if "nsp" in groups:
        rules += _output_weights_rules(
            "nsp_head", "cls.seq_relationship", "cls/seq_relationship/", "nsp"
        )
    if "classifier" in groups:
        rules += _output_weights_rules("classifier", "classifier", "", "classifier")
    if "span" in groups:
        rules += _output_weights_rules("span_head", "qa_outputs", "cls/squad/", "span")
    return rules


_ALL_HEAD_GROUPS = ("mlm", "nsp", "classifier", "span")


def _source_name(rule: TensorRule, fmt: str) -> str:
    return {"hf": rule.hf, "tf": rule.tf, "bert_mini": rule.ours}[fmt]


def _to_ours(array: np.ndarray, rule: TensorRule, fmt: str) -> np.ndarray:
    """Source layout -> bert_mini layout; the same call maps back (transposes are involutions)."""
    transposed = (rule.layout == "linear" and fmt == "hf") or (
        rule.layout == "out_weights" and fmt in ("hf", "tf")
    )
    return np.ascontiguousarray(array.T) if transposed else array


# ----------------------------------------------------------------------------- reading sources


@dataclasses.dataclass
class SourceCheckpoint:
    """A checkpoint read into memory: its config, tensors by source name, and what it says."""

    fmt: str
    weights_path: pathlib.Path
    config_path: pathlib.Path
    config: BertConfig
    tensors: dict[str, np.ndarray]
    head_hint: str | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)

    def groups_present(self) -> tuple[str, ...]:
        """The optional groups (pooler and heads) with at least one tensor in the source."""
        names = set(self.tensors)
        rules = tensor_rules(0, _ALL_HEAD_GROUPS)
        return tuple(
            group
            for group in ("pooler", *_ALL_HEAD_GROUPS)
            if any(_source_name(r, self.fmt) in names for r in rules if r.group == group)
        )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return values


def _activation(name: Any, table: Mapping[str, str], path: pathlib.Path) -> str:
    if name not in table:
        raise CheckpointError(f"{path}: unknown hidden_act {name!r}; supported: {sorted(table)}")
    return table[name]


_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
)


def _config_from_values(
    values: Mapping[str, Any], path: pathlib.Path, hidden_act: str
) -> BertConfig:
    missing = [key for key in _ARCH_KEYS[:5] if key not in values]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}")
    fields = {key: values[key] for key in _ARCH_KEYS if key in values}
    fields["layer_norm_eps"] = values.get("layer_norm_eps", 1e-12)
    try:
        return BertConfig(hidden_act=hidden_act, **fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def hf_config(path: pathlib.Path) -> tuple[BertConfig, str | None]:
    """BertConfig and head hint from a HF ``config.json``; rejects non-BERT architectures."""
    values = _read_json(path)
    if values.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type {values['model_type']!r} is not 'bert'")
    for key, allowed in (("position_embedding_type", "absolute"), ("is_decoder", False)):
        if values.get(key, allowed) != allowed:
            raise CheckpointError(f"{path}: {key}={values[key]!r} is not supported")
    if values.get("add_cross_attention"):
        raise CheckpointError(f"{path}: add_cross_attention is not supported")
    act = _activation(values.get("hidden_act", "gelu"), _HF_ACT_TO_OURS, path)
    config = _config_from_values(values, path, act)
    architecture = (values.get("architectures") or [None])[0]
    hint = {
        "BertForMaskedLM": "mlm",
        "BertForPreTraining": "pretraining",
        "BertForSequenceClassification": "classification",
        "BertForQuestionAnswering": "span",
    }.get(architecture)
    if hint == "classification" and (
        values.get("problem_type") == "regression" or values.get("num_labels") == 1
    ):
        hint = "regression"
    return config, hint


def google_config(path: pathlib.Path) -> BertConfig:
    """BertConfig from Google's ``bert_config.json``; ``gelu`` there means the tanh form."""
    values = _read_json(path)
    unknown = sorted(
        set(values) - set(_ARCH_KEYS) - _GOOGLE_KNOWN_EXTRAS - {"hidden_act", "layer_norm_eps"}
    )
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {unknown} for a BERT config")
    if "bert_mini_hidden_act" in values:
        act = _activation(
            values["bert_mini_hidden_act"], {k: k for k in ("gelu", "gelu_tanh", "relu")}, path
        )
    else:
        act = _activation(values.get("hidden_act", "gelu"), _GOOGLE_ACT_TO_OURS, path)
    return _config_from_values(values, path, act)


def _read_hf_weights(directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    torch_bin = directory / "pytorch_model.bin"
    if single.is_file():
        return single, load_file(single)
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"{index}: shard not found: {directory / shard}")
            tensors.update(load_file(directory / shard))
        return index, tensors
    if torch_bin.is_file():
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{torch_bin}: reading pytorch_model.bin needs torch (pip install torch==2.13.0)"
            ) from None
        state = torch.load(torch_bin, map_location="cpu", weights_only=True)
        return torch_bin, {name: value.float().numpy() for name, value in state.items()}
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin"
    )


def _normalise_hf_tensors(
    tensors: dict[str, np.ndarray], weights_path: pathlib.Path
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips ``bert.``, drops buffers, and checks HF's tied decoder copies are really tied."""
    out = {name.removeprefix("bert."): value for name, value in tensors.items()}
    skipped = [name for name in _HF_BUFFERS if out.pop(name, None) is not None]
    decoder_weight = out.pop("cls.predictions.decoder.weight", None)
    if decoder_weight is not None:
        embeddings = out.get("embeddings.word_embeddings.weight")
        if embeddings is None or not np.array_equal(decoder_weight, embeddings):
            raise CheckpointError(
                f"{weights_path}: tensor 'cls.predictions.decoder.weight' is not tied to "
                "'embeddings.word_embeddings.weight'; untied MLM decoders are not supported"
            )
        skipped.append("cls.predictions.decoder.weight")
    decoder_bias = out.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        bias = out.setdefault("cls.predictions.bias", decoder_bias)
        if not np.array_equal(bias, decoder_bias):
            raise CheckpointError(
                f"{weights_path}: 'cls.predictions.decoder.bias' differs from "
                "'cls.predictions.bias'"
            )
        skipped.append("cls.predictions.decoder.bias")
    return out, skipped


def _tf_checkpoint_prefix(path: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint prefix for a TF directory or prefix path, or None if it is not TF."""
    if pathlib.Path(f"{path}.index").is_file():
        return path
    if not path.is_dir():
        return None
    state_file = path / "checkpoint"
    if state_file.is_file():
        for line in state_file.read_text().splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = line.split(":", 1)[1].strip().strip('"')
                prefix = pathlib.Path(name) if os.path.isabs(name) else path / name
                if pathlib.Path(f"{prefix}.index").is_file():
                    return prefix
    indexes = sorted(path.glob("*.ckpt*.index"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{path}: several TF checkpoints ({[p.name for p in indexes]}); pass the prefix of one"
        )
    return pathlib.Path(str(indexes[0]).removesuffix(".index")) if indexes else None


def _read_tf(prefix: pathlib.Path) -> SourceCheckpoint:
    import tensorflow as tf

    config_path = prefix.parent / "bert_config.json"
    config = google_config(config_path)
    reader = tf.train.load_checkpoint(str(prefix))
    tensors, skipped = {}, []
    for name in reader.get_variable_to_shape_map():
        if name in _TF_NON_PARAMS or name.endswith(_TF_NON_PARAMS_SUFFIXES):
            skipped.append(name)
        else:
            tensors[name] = np.asarray(reader.get_tensor(name))
    hint = None
    if "output_weights" in tensors:
        hint = "regression" if tensors["output_weights"].shape[0] == 1 else "classification"
    return SourceCheckpoint(
        "tf", pathlib.Path(f"{prefix}.index"), config_path, config, tensors, hint, sorted(skipped)
    )


def _read_bert_mini(directory: pathlib.Path) -> SourceCheckpoint:
    import orbax.checkpoint as ocp

    marker = directory / BERT_MINI_MARKER
    meta = _read_json(marker)
    if meta.get("format_version") != BERT_MINI_FORMAT_VERSION:
        raise CheckpointError(
            f"{marker}: unsupported format_version {meta.get('format_version')!r}"
        )
    try:
        config = BertConfig.from_dict(meta["config"], source=str(marker))
    except KeyError:
        raise CheckpointError(f"{marker}: missing key 'config'") from None
    params_dir = directory / "params"
    if not params_dir.is_dir():
        raise FileNotFoundError(f"parameters not found: {params_dir}")
    nested = ocp.StandardCheckpointer().restore(params_dir.resolve())
    tensors = {name: np.asarray(value) for name, value in _flatten(nested).items()}
    return SourceCheckpoint("bert_mini", params_dir, marker, config, tensors, meta.get("head"))


def detect_format(path: pathlib.Path) -> str:
    """``bert_mini``, ``hf`` or ``tf``, from the files at ``path``."""
    if (path / BERT_MINI_MARKER).is_file():
        return "bert_mini"
    if (path / "config.json").is_file():
        return "hf"
    if _tf_checkpoint_prefix(path) is not None:
        return "tf"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected {BERT_MINI_MARKER} (bert_mini), config.json (HF) "
        "or bert_config.json + *.ckpt.index (Google TF)"
    )


def read_checkpoint(path: str | os.PathLike) -> SourceCheckpoint:
    """Reads any supported checkpoint into memory (no model is built yet)."""
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "bert_mini":
        return _read_bert_mini(path)
    if fmt == "hf":
        config, hint = hf_config(path / "config.json")
        weights_path, raw = _read_hf_weights(path)
        tensors, skipped = _normalise_hf_tensors(raw, weights_path)
        return SourceCheckpoint(
            "hf", weights_path, path / "config.json", config, tensors, hint, skipped
        )
    prefix = _tf_checkpoint_prefix(path)
    assert prefix is not None
    return _read_tf(prefix)


# ----------------------------------------------------------------------------- building models


@dataclasses.dataclass
class LoadReport:
    """What an import did beyond copying tensors: fresh heads, dropped heads, skipped non-params."""

    source: str
    head: str | None
    new_groups: list[str] = dataclasses.field(default_factory=list)
    dropped_groups: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.new_groups:
            out.append(f"{self.source}: created fresh (random init): {', '.join(self.new_groups)}")
        if self.dropped_groups:
            out.append(f"{self.source}: dropped unused heads: {', '.join(self.dropped_groups)}")
        if self.skipped:
            out.append(f"{self.source}: skipped non-parameters: {', '.join(self.skipped)}")
        return out


def _auto_head(source: SourceCheckpoint) -> str | None:
    """The head a converter should keep: everything the source has."""
    present = set(source.groups_present())
    if source.head_hint is not None:
        return source.head_hint
    if {"mlm", "nsp"} <= present:
        return "pretraining"
    for group, head in (("mlm", "mlm"), ("classifier", "classification"), ("span", "span")):
        if group in present:
            return head
    return None


def _shorten(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _num_labels(source: SourceCheckpoint, head: str | None, requested: int | None) -> int:
    rule = next(r for r in tensor_rules(0, ("classifier",)) if r.ours == "classifier/bias")
    name = _source_name(rule, source.fmt)
    if head not in ("classification", "regression") or name not in source.tensors:
        if head == "regression":
            return 1
        return 2 if requested is None else requested
    found = int(source.tensors[name].shape[0])
    expected = 1 if head == "regression" else requested
    if expected is not None and expected != found:
        raise CheckpointError(
            f"{source.weights_path}: tensor {name!r} has {found} labels, "
            f"but {expected} were asked for"
        )
    return found


def build_model(
    source: SourceCheckpoint,
    head: str | None = None,
    num_labels: int | None = None,
    *,
    new_head: bool = False,
    drop_heads: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
) -> tuple[BertModel, LoadReport]:
    """A ``BertModel`` holding the source's tensors, checked strictly (see module docstring).

    ``head="auto"`` keeps every head the source has.
    """
    if head == "auto":
        head = _auto_head(source)
    if head not in HEAD_CHOICES:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEAD_CHOICES)} or 'auto'")
    config = dataclasses.replace(source.config, dtype=dtype, param_dtype=param_dtype)
    model = create_model(config, head, _num_labels(source, head, num_labels), seed)
    report = LoadReport(str(source.weights_path), head, skipped=list(source.skipped))

    state = nnx.state(model, nnx.Param)
    variables = {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    rules = tensor_rules(config.num_hidden_layers, model.heads)
    assert {r.ours for r in rules} == set(variables), "tensor_rules out of sync with BertModel"

    where = source.weights_path
    missing: dict[str, list[str]] = {}
    used: set[str] = set()
    for rule in rules:
        name = _source_name(rule, source.fmt)
        if name not in source.tensors:
            missing.setdefault(rule.group, []).append(name)
            continue
        array = _to_ours(source.tensors[name], rule, source.fmt)
        variable = variables[rule.ours]
        expected_shape = tuple(variable.get_value().shape)
        if tuple(array.shape) != expected_shape:
            stored = tuple(source.tensors[name].shape)
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {stored}, but {source.config_path.name} "
                f"implies {_to_ours(np.empty(expected_shape), rule, source.fmt).shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{where}: tensor {name!r} has non-float dtype {array.dtype}")
        variable.set_value(np.asarray(array, dtype=config.param_dtype))
        used.add(name)

    for group, names in missing.items():
        whole_group_missing = len(names) == sum(r.group == group for r in rules)
        if group != "encoder" and whole_group_missing and new_head:
            report.new_groups.append(group)
            continue
        hint = (
            "; pass new_head=True to create it fresh"
            if group != "encoder" and whole_group_missing
            else ""
        )
        raise CheckpointError(f"{where}: missing {group} tensor(s) {_shorten(names)}{hint}")

    unused = sorted(set(source.tensors) - used)
    if unused:
        head_rules = tensor_rules(0, _ALL_HEAD_GROUPS)
        group_of = {_source_name(r, source.fmt): r.group for r in head_rules}
        known = all(name in group_of for name in unused)
        if not (known and drop_heads):
            hint = "; pass drop_heads=True to drop the unused heads" if known else ""
            raise CheckpointError(f"{where}: unused tensor(s) {_shorten(unused)}{hint}")
        report.dropped_groups = sorted({group_of[name] for name in unused})
    nnx.update(model, state)
    return model, report


# ----------------------------------------------------------------------------- public loading


def _tokenizer_dir(path: pathlib.Path) -> pathlib.Path:
    return path if path.is_dir() else path.parent


def load_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    num_labels: int | None = None,
    *,
    new_head: bool = False,
    drop_heads: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
) -> tuple[BertModel, BertTokenizer, LoadReport]:
    """``from_pretrained`` plus the load report."""
    path = pathlib.Path(path)
    source = read_checkpoint(path)
    tokenizer = BertTokenizer.from_pretrained(_tokenizer_dir(path))
    model, report = build_model(
        source,
        head,
        num_labels,
        new_head=new_head,
        drop_heads=drop_heads,
        dtype=dtype,
        param_dtype=param_dtype,
        seed=seed,
    )
    if tokenizer.vocab_size > source.config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.vocab_path}: {tokenizer.vocab_size} tokens, but {source.config_path} "
            f"has vocab_size {source.config.vocab_size} (word embeddings too small)"
        )
    for line in report.lines():
        logging.info(line)
    if report.new_groups:
        logging.warning("%s: created fresh (random init): %s", path, ", ".join(report.new_groups))
    return model, tokenizer, report


def from_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    num_labels: int | None = None,
    *,
    new_head: bool = False,
    drop_heads: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
) -> tuple[BertModel, BertTokenizer]:
    """Loads a Google TF, HF or bert_mini checkpoint directory as ``(model, tokenizer)``.

    ``head``: None (encoder + pooler), "mlm", "pretraining", "classification", "regression",
    "span", or "auto" (whatever the source has). Strict: see ``build_model``.
    """
    model, tokenizer, _ = load_pretrained(
        path,
        head,
        num_labels,
        new_head=new_head,
        drop_heads=drop_heads,
        dtype=dtype,
        param_dtype=param_dtype,
        seed=seed,
    )
    return model, tokenizer


# ----------------------------------------------------------------------------- export


def model_tensors(model: BertModel, fmt: str) -> dict[str, np.ndarray]:
    """The model's parameters as float32 arrays under the names and layouts of ``fmt``."""
    state = nnx.state(model, nnx.Param)
    values = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    prefix = "bert." if fmt == "hf" and model.head is not None else ""
    out = {}
    for rule in tensor_rules(model.config.num_hidden_layers, model.heads):
        name = _source_name(rule, fmt)
        if prefix and rule.group in ("encoder", "pooler"):
            name = prefix + name
        out[name] = _to_ours(values[rule.ours].astype(np.float32), rule, fmt)
    return out


def hf_config_dict(model: BertModel) -> dict[str, Any]:
    config = model.config
    values: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[model.head]],
        "model_type": "bert",
        **{key: getattr(config, key) for key in _ARCH_KEYS},
        "hidden_act": _OURS_TO_HF_ACT[config.hidden_act],
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    if model.head in ("classification", "regression"):
        values["num_labels"] = model.num_labels
        values["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        values["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
        values["problem_type"] = (
            "regression" if model.head == "regression" else "single_label_classification"
        )
    return values


def google_config_dict(config: BertConfig) -> dict[str, Any]:
    values = {key: getattr(config, key) for key in _ARCH_KEYS}
    values["hidden_act"] = _OURS_TO_GOOGLE_ACT[config.hidden_act]
    values["bert_mini_hidden_act"] = config.hidden_act
    values["layer_norm_eps"] = config.layer_norm_eps
    return values


def _write_json(path: pathlib.Path, values: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _atomic_directory(dst: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a scratch directory that replaces ``dst`` only once everything is written."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"destination exists: {dst} (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if dst.exists():
        retired = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(retired)
        scratch.rename(dst)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        scratch.rename(dst)


def _save_hf(model: BertModel, directory: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    _write_json(directory / "config.json", hf_config_dict(model))
    save_file(
        model_tensors(model, "hf"), directory / "model.safetensors", metadata={"format": "pt"}
    )


def _save_tf(model: BertModel, directory: pathlib.Path) -> None:
    import tensorflow as tf

    _write_json(directory / "bert_config.json", google_config_dict(model.config))
    tensors = model_tensors(model, "tf")
    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(directory / TF_CHECKPOINT_NAME),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[name]) for name in names],
    )
    (directory / "checkpoint").write_text(
        f'model_checkpoint_path: "{TF_CHECKPOINT_NAME}"\n'
        f'all_model_checkpoint_paths: "{TF_CHECKPOINT_NAME}"\n'
    )


def _save_bert_mini(model: BertModel, directory: pathlib.Path) -> None:
    import orbax.checkpoint as ocp

    meta = {
        "format_version": BERT_MINI_FORMAT_VERSION,
        "head": model.head,
        "num_labels": model.num_labels,
        "config": model.config.to_dict(),
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        (directory / "params").resolve(), _unflatten(model_tensors(model, "bert_mini"))
    )
    checkpointer.wait_until_finished()
    _write_json(directory / BERT_MINI_MARKER, meta)


def save_pretrained(
    model: BertModel,
    tokenizer: BertTokenizer | None,
    dst: str | os.PathLike,
    fmt: str = "bert_mini",
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``model`` (and the tokenizer's vocab) to ``dst`` in ``fmt``, atomically.

    ``dst`` is replaced only after the new checkpoint is complete, so a crash or an error leaves
    an existing checkpoint intact.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    dst = pathlib.Path(dst)
    writer = {"hf": _save_hf, "tf": _save_tf, "bert_mini": _save_bert_mini}[fmt]
    with _atomic_directory(dst, overwrite) as scratch:
        writer(model, scratch)
        if tokenizer is not None:
            tokenizer.save(scratch)
    return dst


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
