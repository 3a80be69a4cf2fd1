"""BERT WordPiece tokenization from a Google ``vocab.txt``.

The pipeline is assembled from the parts of the Rust ``tokenizers`` library rather than loaded from
a ``tokenizer.json``: Google's checkpoints (and the miniature BERTs) ship only ``vocab.txt``, and
building it here keeps the exact BERT semantics visible (clean text, CJK splitting, accent
stripping tied to lower-casing, whitespace+punctuation pre-splitting, greedy longest-match
WordPiece with a 100-character word limit). It produces the same ids as ``BertTokenizerFast``
while batch encoding runs in parallel in Rust.

Special tokens written literally in the input text (e.g. ``"[MASK]"``) are matched as special
tokens, as in Hugging Face's tokenizers (Google's original Python code would split them).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

__all__ = ["SPECIAL_TOKENS", "BertTokenizer", "load_vocab"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

VOCAB_FILENAME = "vocab.txt"
CONFIG_FILENAME = "tokenizer_config.json"

# BERT's own limit: a whitespace/punctuation-delimited word longer than this becomes [UNK].
_MAX_INPUT_CHARS_PER_WORD = 100
# Configured Tokenizer copies kept per (max_length, padding, truncation); a handful is plenty.
_MAX_CACHED_CONFIGS = 8
_PADDING_MODES = ("max_length", "longest")


def load_vocab(vocab_path: str | os.PathLike) -> dict[str, int]:
    """Read a Google/HF ``vocab.txt``: one token per line, id = 0-based line number.

    Lines are split on ``"\\n"`` only (a trailing ``"\\r"`` is dropped), because a vocab token
    may itself contain other characters Python treats as line breaks. The file is validated
    strictly (empty lines, duplicates, missing special tokens) since any of these silently
    shifts ids and corrupts every lookup into a pretrained embedding table. Every error is one
    line naming the file, and the 1-based line where one applies.
    """
    path = os.fspath(vocab_path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"vocab path is a directory: {path} (pass the {VOCAB_FILENAME} inside it, "
            "or use BertTokenizer.from_pretrained)"
        )
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"vocab file not found: {path}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if not text:
        raise ValueError(f"{path}: empty vocab file")
    if text.startswith("\ufeff"):
        raise ValueError(f"{path}:1: file starts with a UTF-8 byte-order mark; remove it")

    lines = text.split("\n")
    if lines[-1] == "":  # the usual final newline, not an extra empty token
        lines.pop()
    vocab: dict[str, int] = {}
    for idx, raw in enumerate(lines):
        token = raw[:-1] if raw.endswith("\r") else raw
        if not token:
            raise ValueError(f"{path}:{idx + 1}: empty token")
        first = vocab.get(token)
        if first is not None:
            raise ValueError(
                f"{path}:{idx + 1}: duplicate token {token!r} (first at line {first + 1})"
            )
        vocab[token] = idx

    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if len(missing) == 1:
        raise ValueError(f"{path}: missing special token {missing[0]}")
    if missing:
        raise ValueError(f"{path}: missing special tokens {', '.join(missing)}")
    return vocab


def _do_lower_case_from_name(path: Path) -> bool:
    """Guess casing from a name the way Google names checkpoints (``cased_L-12_...``).

    Only "cased" without "uncased" means cased; anything else defaults to uncased, which is
    what every Google miniature BERT and bert-base-uncased use.
    """
    names = [path.name] if path.is_dir() else [path.name, path.parent.name]
    for name in names:
        lowered = name.lower()
        if "uncased" in lowered:
            return True
        if "cased" in lowered:
            return False
    return True


def check_batch_inputs(
    texts: str | Sequence[str],
    pairs: str | Sequence[str] | None,
    max_length: int,
    padding: str,
) -> tuple[list[str], list[str] | None, int, int]:
    """Validates a tokenizer call: ``(texts, pairs or None, max_length, special tokens per row)``.

    Shared by the WordPiece and SentencePiece tokenizers so both fail the same way.
    """
    batch = [texts] if isinstance(texts, str) else list(texts)
    second: list[str] | None = None
    if pairs is not None:
        second = [pairs] if isinstance(pairs, str) else list(pairs)
        if len(second) != len(batch):
            raise ValueError(
                f"pairs has {len(second)} items but texts has {len(batch)}; "
                "they must be the same length"
            )
    for name, column in (("texts", batch), ("pairs", second or [])):
        for i, t in enumerate(column):
            if not isinstance(t, str):
                raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected str")
    if padding not in _PADDING_MODES:
        raise ValueError(f"padding must be one of {_PADDING_MODES}, got {padding!r}")
    max_length = int(max_length)
    n_special = 3 if second is not None else 2
    if max_length < n_special:
        kind = "pairs" if second is not None else "single texts"
        raise ValueError(
            f"max_length={max_length} is too small: {kind} need at least {n_special} "
            "positions for [CLS]/[SEP]"
        )
    return batch, second, max_length, n_special


class BertTokenizer:
    """BERT WordPiece tokenizer returning fixed-shape int32 numpy batches for JAX.

    Thread-safe: the base Rust tokenizer is never mutated after construction, and each
    (max_length, padding, truncation) setting gets its own configured copy from a small
    lock-protected cache, because ``enable_truncation``/``enable_padding`` mutate a
    ``tokenizers.Tokenizer`` and would race with concurrent ``encode_batch`` calls.
    """

    vocab_path: str
    vocab: dict[str, int]
    do_lower_case: bool
    strip_accents: bool | None
    tokenize_chinese_chars: bool

    def __init__(
        self,
        vocab_path: str | os.PathLike,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
    ) -> None:
        """Load ``vocab_path``. ``strip_accents=None`` follows ``do_lower_case`` (BERT's rule)."""
        self.vocab_path = os.fspath(vocab_path)
        self.vocab = load_vocab(self.vocab_path)
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self._inv_vocab: list[str] | None = None
        self._tokenizer = self._build()
        self._init_cache()

    # ----------------------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        """Number of rows the embedding table needs."""
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self.vocab["[MASK]"]

    # ------------------------------------------------------------------------ building

    def _build(self) -> Tokenizer:
        """Assemble the BERT pipeline; no truncation/padding (those live in per-call copies)."""
        tok = Tokenizer(
            models.WordPiece(
                self.vocab,
                unk_token="[UNK]",
                max_input_chars_per_word=_MAX_INPUT_CHARS_PER_WORD,
            )
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=self.tokenize_chinese_chars,
            strip_accents=self.strip_accents,
            lowercase=self.do_lower_case,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)],
        )
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        # Registered as special so decode() can skip them and literal "[MASK]" in text maps to
        # its id; normalized=False so lower-casing cannot hide them (same as BertTokenizerFast).
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        return tok

    def _init_cache(self) -> None:
        self._configured: OrderedDict[tuple[int, str, bool], Tokenizer] = OrderedDict()
        self._lock = threading.Lock()

    def _configured_tokenizer(self, max_length: int, padding: str, truncation: bool) -> Tokenizer:
        """Return a copy configured for this call's settings; created once, never mutated after."""
        key = (max_length, padding, truncation)
        with self._lock:
            tok = self._configured.get(key)
            if tok is not None:
                self._configured.move_to_end(key)
                return tok
        tok = Tokenizer.from_str(self._tokenizer.to_str())
        if truncation:
            tok.enable_truncation(max_length, stride=0, strategy="longest_first")
        tok.enable_padding(
            direction="right",
            pad_id=self.pad_id,
            pad_type_id=0,
            pad_token="[PAD]",
            length=max_length if padding == "max_length" else None,
        )
        with self._lock:
            tok = self._configured.setdefault(key, tok)
            self._configured.move_to_end(key)
            while len(self._configured) > _MAX_CACHED_CONFIGS:
                self._configured.popitem(last=False)
        return tok

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the lock/cache so the tokenizer can be sent to worker processes."""
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_configured", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_path={self.vocab_path!r}, vocab_size={self.vocab_size}, "
            f"do_lower_case={self.do_lower_case}, strip_accents={self.strip_accents}, "
            f"tokenize_chinese_chars={self.tokenize_chinese_chars})"
        )

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, do_lower_case: bool | None = None
    ) -> BertTokenizer:
        """Load from a checkpoint directory (HF, Google or bert_mini) or a vocab file.

        Casing comes from ``tokenizer_config.json`` in the directory when present, else from the
        directory/file name (Google names cased models ``cased_...``), so a wrong guess cannot
        silently happen for saved tokenizers. An explicit ``do_lower_case`` overrides both.
        """
        p = Path(os.fspath(path))
        if p.is_dir():
            vocab_file = p / VOCAB_FILENAME
            if not vocab_file.is_file():
                raise FileNotFoundError(f"vocab file not found: {vocab_file}")
            config_file = p / CONFIG_FILENAME
        elif p.is_file():
            vocab_file, config_file = p, None
        else:
            raise FileNotFoundError(f"vocab file not found: {p}")

        kwargs: dict[str, Any] = {}
        if config_file is not None and config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: invalid JSON ({e})") from None
            for key in ("do_lower_case", "strip_accents", "tokenize_chinese_chars"):
                if config.get(key) is not None:
                    kwargs[key] = config[key]
        kwargs.setdefault("do_lower_case", _do_lower_case_from_name(p))
        if do_lower_case is not None:
            kwargs["do_lower_case"] = do_lower_case
        return cls(vocab_file, **kwargs)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.txt`` (byte-identical copy) and ``tokenizer_config.json``.

        The config uses Hugging Face's keys so ``AutoTokenizer``/``BertTokenizerFast``
        ``.from_pretrained(directory)`` load the same tokenizer.
        """
        out = Path(os.fspath(directory))
        out.mkdir(parents=True, exist_ok=True)
        dst = out / VOCAB_FILENAME
        if not (dst.exists() and os.path.samefile(self.vocab_path, dst)):
            shutil.copyfile(self.vocab_path, dst)
        config = {
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "tokenizer_class": "BertTokenizer",
        }
        (out / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # --------------------------------------------------------------------- encoding

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` without [CLS]/[SEP] (for inspection and MLM data)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Map tokens to ids; unknown tokens map to [UNK] as in BERT."""
        unk = self.unk_id
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Inverse of :meth:`convert_tokens_to_ids` (an id out of range is an IndexError)."""
        if self._inv_vocab is None:
            inv = [""] * len(self.vocab)
            for tok, i in self.vocab.items():
                inv[i] = tok
            self._inv_vocab = inv
        return [self._inv_vocab[int(i)] for i in np.asarray(ids).reshape(-1)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Ids back to text: joins ``##`` pieces and drops specials/padding by default."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tokenizer.decode(flat, skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        *,
        max_length: int = 128,
        padding: str = "max_length",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Encode a batch into int32 ``input_ids``/``token_type_ids``/``attention_mask`` [B, L].

        ``L = max_length`` with ``padding="max_length"`` (static shapes avoid JAX recompiles),
        or the longest row with ``padding="longest"``. Pairs are encoded as
        ``[CLS] a [SEP] b [SEP]`` with type ids 0/1, and truncated longest-first like BERT's
        GLUE code. With ``truncation=False`` an over-long row is an error rather than a
        silently clipped example.
        """
        batch, second, max_length, n_special = check_batch_inputs(texts, pairs, max_length, padding)

        if not batch:
            width = max_length if padding == "max_length" else 0
            empty = np.zeros((0, width), dtype=np.int32)
            return {
                "input_ids": empty,
                "token_type_ids": empty.copy(),
                "attention_mask": empty.copy(),
            }

        tok = self._configured_tokenizer(max_length, padding, bool(truncation))
        inputs: list[Any] = batch if second is None else list(zip(batch, second, strict=True))
        encodings = tok.encode_batch(inputs, add_special_tokens=True)

        if not truncation:
            for i, enc in enumerate(encodings):
                n = sum(enc.attention_mask)
                if n > max_length:
                    raise ValueError(
                        f"row {i} has {n} tokens (with [CLS]/[SEP]), more than "
                        f"max_length={max_length}; pass truncation=True or a larger max_length"
                    )

        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int32),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int32),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int32),
        }


if __name__ == "__main__":
    # `python -m bert_mini.tokenization train-spm ...`: train a SentencePiece vocabulary.
    import sys

    from bert_mini.sentencepiece_tokenizer import main

    sys.exit(main(sys.argv[1:]))
