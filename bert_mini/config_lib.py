"""Shared configuration helpers: the table of BERT sizes from Turc et al. (2019).

The paper's 24 compact models are ``L-{2,4,6,8,10,12}_H-{128,256,512,768}`` with ``A = H / 64``
heads and a ``4H`` feed-forward layer; BERT-Base (``L-12_H-768``) is one of them, and BERT-Large
(``L-24_H-1024``, 16 heads) is the paper's biggest teacher. A variant is named as in Google's
release (``uncased_L-4_H-256_A-4``), as ``L-4_H-256``, or by its nickname (``mini``).
"""

import re
from typing import TypedDict

LAYER_CHOICES = (2, 4, 6, 8, 10, 12)
HIDDEN_CHOICES = (128, 256, 512, 768)

NAMED_VARIANTS = {
    "tiny": "L-2_H-128",
    "mini": "L-4_H-256",
    "small": "L-4_H-512",
    "medium": "L-8_H-512",
    "base": "L-12_H-768",
    "large": "L-24_H-1024",
}


class VariantDims(TypedDict):
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int


def _dims(layers: int, hidden: int, heads: int) -> VariantDims:
    return VariantDims(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )


SIZES: dict[str, VariantDims] = {
    f"L-{layers}_H-{hidden}": _dims(layers, hidden, hidden // 64)
    for layers in LAYER_CHOICES
    for hidden in HIDDEN_CHOICES
}
SIZES["L-24_H-1024"] = _dims(24, 1024, 16)

_VARIANT_RE = re.compile(r"^(?:.*/)?(?:bert[_-])?(?:(?:un)?cased_)?L-(\d+)_H-(\d+)(?:_A-(\d+))?$")


def canonical_variant(name: str) -> str:
    """Maps ``mini``, ``bert-mini``, ``uncased_L-4_H-256_A-4`` or ``L-4_H-256`` to ``L-4_H-256``."""
    key = name.strip().lower()
    key = key.removeprefix("bert-").removeprefix("bert_")
    if key in NAMED_VARIANTS:
        return NAMED_VARIANTS[key]
    match = _VARIANT_RE.match(name.strip())
    if match is None:
        raise ValueError(f"unknown model variant {name!r}; {_choices()}")
    layers, hidden, heads = match.groups()
    variant = f"L-{int(layers)}_H-{int(hidden)}"
    if variant not in SIZES:
        raise ValueError(f"unknown model variant {name!r}; {_choices()}")
    if heads is not None and int(heads) != SIZES[variant]["num_attention_heads"]:
        expected = SIZES[variant]["num_attention_heads"]
        raise ValueError(f"model variant {name!r} names A-{heads}, but {variant} has A-{expected}")
    return variant


def variant_dims(name: str) -> VariantDims:
    """The layer count, width, heads and FFN width of a named variant."""
    return SIZES[canonical_variant(name)]


def _choices() -> str:
    return f"choose one of {sorted(NAMED_VARIANTS)} or L-<layers>_H-<hidden> from {list(SIZES)}"
