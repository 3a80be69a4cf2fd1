"""One table that names every BERT parameter three ways, as t5x's checkpoint importer does.

Each ``TensorRule`` gives bert_mini's NNX path (``layers/0/attention/query/kernel``), the Hugging
Face name (``encoder.layer.0.attention.self.query.weight``, without the ``bert.`` prefix) and
Google's TF variable name (``bert/encoder/layer_0/attention/self/query/kernel``), plus the layout
change between them. Flax kernels and Google TF kernels are [in, out]; PyTorch ``Linear`` weights
are [out, in]; Google's ``output_weights`` of the NSP, classifier and SQuAD heads are [out, in].
Import and export both read this table, so the two directions cannot drift apart.
"""

import dataclasses

import numpy as np

HEAD_GROUPS = ("mlm", "nsp", "classifier", "span")


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


def source_name(rule: TensorRule, fmt: str) -> str:
    return {"hf": rule.hf, "tf": rule.tf, "bert_mini": rule.ours}[fmt]


def convert_layout(array: np.ndarray, rule: TensorRule, fmt: str) -> np.ndarray:
    """Source layout -> bert_mini layout; the same call maps back (transposes are involutions)."""
    transposed = (rule.layout == "linear" and fmt == "hf") or (
        rule.layout == "out_weights" and fmt in ("hf", "tf")
    )
    return np.ascontiguousarray(array.T) if transposed else array
