"""bert_mini: compact BERTs and Pre-trained Distillation (Turc et al., 2019) in JAX / Flax NNX.

The public API is imported lazily, so ``python -m bert_mini.<module>`` runs each module once
and ``import bert_mini`` stays cheap.
"""

import importlib
from typing import Any

_EXPORTS = {
    "BertConfig": "bert_mini.model",
    "BertModel": "bert_mini.model",
    "BertOutput": "bert_mini.model",
    "create_model": "bert_mini.model",
    "BertTokenizer": "bert_mini.tokenization",
    "from_pretrained": "bert_mini.checkpoints",
    "load_pretrained": "bert_mini.checkpoints",
    "save_pretrained": "bert_mini.checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bert_mini' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
