"""bert_mini: compact BERTs and Pre-trained Distillation (Turc et al., 2019) in JAX / Flax NNX."""

from bert_mini.checkpoints import from_pretrained, load_pretrained, save_pretrained
from bert_mini.model import BertConfig, BertModel, BertOutput, create_model
from bert_mini.tokenization import BertTokenizer

__all__ = [
    "BertConfig",
    "BertModel",
    "BertOutput",
    "BertTokenizer",
    "create_model",
    "from_pretrained",
    "load_pretrained",
    "save_pretrained",
]
