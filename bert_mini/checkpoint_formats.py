"""Reading and writing the three checkpoint formats: Google TF, Hugging Face and bert_mini.

Readers turn a directory into a ``SourceCheckpoint``: a ``BertConfig`` plus ``{source name:
array}``, with known non-parameters (HF buffers, Google's Adam slots and step counter) set aside
and named. Writers turn a model into the target's files. Neither decides which tensors a model
needs: that strict check lives in ``checkpoints.build_model``.

Activation: Google's TF BERT computes the tanh GELU although its configs say ``gelu``, while HF's
``gelu`` is the exact erf form. Reading honours the source; writing emits what the target reads
back the same way (``gelu_new`` for HF; for TF an extra ``bert_mini_hidden_act`` key, ignored by
Google's code, keeps an erf model erf).
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from bert_mini.checkpoint_names import HEAD_GROUPS, convert_layout, source_name, tensor_rules
from bert_mini.model import BertConfig, BertModel

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
        rules = tensor_rules(0, HEAD_GROUPS)
        return tuple(
            group
            for group in ("pooler", *HEAD_GROUPS)
            if any(source_name(r, self.fmt) in names for r in rules if r.group == group)
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


def _tensorflow():
    """TensorFlow, imported only for TF checkpoints (slow to import; quiet C++ logs)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only does file I/O here
    import tensorflow as tf

    return tf


def _read_tf(prefix: pathlib.Path) -> SourceCheckpoint:
    tf = _tensorflow()

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


# ----------------------------------------------------------------------------- export


def model_tensors(model: BertModel, fmt: str) -> dict[str, np.ndarray]:
    """The model's parameters as float32 arrays under the names and layouts of ``fmt``."""
    state = nnx.state(model, nnx.Param)
    values = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    prefix = "bert." if fmt == "hf" and model.head is not None else ""
    out = {}
    for rule in tensor_rules(model.config.num_hidden_layers, model.heads):
        name = source_name(rule, fmt)
        if prefix and rule.group in ("encoder", "pooler"):
            name = prefix + name
        out[name] = convert_layout(values[rule.ours].astype(np.float32), rule, fmt)
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


def write_hf(model: BertModel, directory: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    _write_json(directory / "config.json", hf_config_dict(model))
    save_file(
        model_tensors(model, "hf"), directory / "model.safetensors", metadata={"format": "pt"}
    )


def write_tf(model: BertModel, directory: pathlib.Path) -> None:
    tf = _tensorflow()

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


def write_bert_mini(model: BertModel, directory: pathlib.Path) -> None:
    import orbax.checkpoint as ocp

    meta = {
        "format_version": BERT_MINI_FORMAT_VERSION,
        "head": model.head,
        "num_labels": model.num_labels,
        "config": model.config.to_dict(),
    }
    import jax

    # An export is host-local (numpy arrays, one writer): no barrier with the other processes.
    this_process = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process)
    checkpointer.save(
        (directory / "params").resolve(), _unflatten(model_tensors(model, "bert_mini"))
    )
    checkpointer.wait_until_finished()
    _write_json(directory / BERT_MINI_MARKER, meta)


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


WRITERS: dict[str, Callable[[BertModel, pathlib.Path], None]] = {
    "hf": write_hf,
    "tf": write_tf,
    "bert_mini": write_bert_mini,
}
