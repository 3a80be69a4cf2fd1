"""SentencePiece vocabularies for bert_mini: train one on any corpus, then use it like BERT's.

The paper's students reuse Google's WordPiece vocab, but a new domain or language needs its own;
SentencePiece trains one from raw text in seconds. ``train_spm`` puts BERT's special tokens at
the ids the rest of bert_mini assumes ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), and
``SentencePieceTokenizer`` has the call API of ``BertTokenizer``, so models, data pipelines and
MLM masking work with either. [CLS]/[SEP]/[MASK] are *control* symbols: they never come out of
encoding text (a literal "[MASK]" in the text is split like any other word), the code inserts
them by id. Lower-casing (the default) is the model's own ``nmt_nfkc_cf`` normalisation, so it
is stored in the ``.model`` file and applied at encode time without a flag to get wrong.

CLI: ``python -m bert_mini.tokenization train-spm --input 'corpus/*.txt.gz' --model-prefix
out/spm --vocab-size 30522`` (``--help`` lists every flag).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from bert_mini.tokenization import SPECIAL_TOKENS, check_batch_inputs

__all__ = [
    "MODEL_FILENAME",
    "SentencePieceTokenizer",
    "build_parser",
    "expand_globs",
    "iter_corpus_lines",
    "main",
    "train_spm",
    "truncate_pair_lengths",
]

MODEL_FILENAME = "spiece.model"
CONFIG_FILENAME = "tokenizer_config.json"
MODEL_TYPES = ("unigram", "bpe")
# Pieces 0..4: pad and unk are SentencePiece's own slots, the rest control symbols in order.
_PAD, _UNK, _CLS, _SEP, _MASK = SPECIAL_TOKENS


# --------------------------------------------------------------------------------- training


def expand_globs(patterns: Sequence[str]) -> list[Path]:
    """Sorted, de-duplicated files matching any pattern; a pattern matching nothing is an error.

    Failing on the first empty pattern (rather than training on whatever the others matched)
    catches typos before a long training run silently uses less data than intended.
    """
    files: dict[str, None] = {}
    for pattern in patterns:
        matches = sorted(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matched no files")
        files.update(dict.fromkeys(matches))
    return [Path(p) for p in files]


def iter_corpus_lines(paths: Sequence[Path]) -> Iterator[str]:
    """Non-empty, stripped lines of plain or gzipped UTF-8 text files, streamed.

    Gzip is detected by its magic bytes, not the name. A byte sequence that is not UTF-8 is an
    error naming the file and line, because a silently dropped or mangled line changes the vocab.
    """
    for path in paths:
        with open(path, "rb") as probe:
            is_gzip = probe.read(2) == b"\x1f\x8b"
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
                if line:
                    yield line


def train_spm(
    input_globs: str | Sequence[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 30522,
    model_type: str = "unigram",
    lowercase: bool = True,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 1_000_000,
    seed: int = 0,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
) -> Path:
    """Train a SentencePiece model with BERT's special tokens at ids 0-4; returns the ``.model``.

    ``input_sentence_size`` lines are sampled (with ``seed``) from the whole stream, which bounds
    memory and time on big corpora; 0 uses every line. ``max_sentence_length`` is in bytes:
    longer lines (WikiText/Gutenberg paragraphs can be long) are skipped by the trainer.
    Writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    patterns = [input_globs] if isinstance(input_globs, str) else list(input_globs)
    if not patterns:
        raise ValueError("no input given: pass at least one file or glob")
    paths = expand_globs(patterns)
    prefix = Path(os.fspath(model_prefix))
    prefix.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_corpus_lines(paths),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        pad_id=0,
        pad_piece=_PAD,
        unk_id=1,
        unk_piece=_UNK,
        bos_id=-1,
        eos_id=-1,
        control_symbols=[_CLS, _SEP, _MASK],
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return prefix.with_name(prefix.name + ".model")


# ------------------------------------------------------------------------------- tokenizer


def truncate_pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep so ``len_a + len_b <= budget``, longest first, as ``BertTokenizer`` does.

    This is the Hugging Face ``tokenizers`` "longest_first" rule (what ``BertTokenizer`` runs):
    the shorter text is kept whole when it fits in half, otherwise both get half and the odd slot
    goes to the longer one (to ``b`` on ties). Google's original loop differs only in who gets
    that odd slot; matching ``BertTokenizer`` keeps the two tokenizers interchangeable.
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    swap = len_a > len_b
    short, long = (len_b, len_a) if swap else (len_a, len_b)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    return (long, short) if swap else (short, long)


class SentencePieceTokenizer:
    """A SentencePiece model behind ``BertTokenizer``'s API: fixed-shape int32 numpy batches."""

    model_path: str
    vocab: dict[str, int]

    def __init__(self, model_path: str | os.PathLike) -> None:
        """Load ``model_path`` and check that ids 0-4 are BERT's special tokens."""
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from None
        self._check_special_ids()
        self.vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def _check_special_ids(self) -> None:
        """Models not made by ``train_spm`` would put [CLS] etc. at other ids: refuse them."""
        n = self._sp.get_piece_size()
        for i, token in enumerate(SPECIAL_TOKENS):
            found = self._sp.id_to_piece(i) if i < n else None
            if found != token:
                raise ValueError(
                    f"{self.model_path}: id {i} is {found!r}, expected {token!r} "
                    "(train the model with bert_mini's train_spm)"
                )

    # ----------------------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        """Number of rows the embedding table needs."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def cls_id(self) -> int:
        return 2

    @property
    def sep_id(self) -> int:
        return 3

    @property
    def mask_id(self) -> int:
        return 4

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the model bytes, so the tokenizer can go to worker processes."""
        state = self.__dict__.copy()
        state["_sp"] = self._sp.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp")
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor()
        self._sp.load_from_serialized_proto(proto)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_path={self.model_path!r}, vocab_size={self.vocab_size})"
        )

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Load from a directory written by :meth:`save` (or holding one ``.model``) or a file."""
        p = Path(os.fspath(path))
        if p.is_file():
            return cls(p)
        if not p.is_dir():
            raise FileNotFoundError(f"SentencePiece model not found: {p}")
        config_file = p / CONFIG_FILENAME
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: invalid JSON ({e})") from None
            model_file = config.get("model_file")
            if model_file:
                return cls(p / model_file)
        if (p / MODEL_FILENAME).is_file():
            return cls(p / MODEL_FILENAME)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return cls(models[0])
        raise FileNotFoundError(
            f"no SentencePiece model in {p}: expected {MODEL_FILENAME} "
            f"(found {len(models)} *.model files)"
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``spiece.model`` (byte-identical copy) and ``tokenizer_config.json``."""
        out = Path(os.fspath(directory))
        out.mkdir(parents=True, exist_ok=True)
        dst = out / MODEL_FILENAME
        if not (dst.exists() and os.path.samefile(self.model_path, dst)):
            shutil.copyfile(self.model_path, dst)
        config = {"tokenizer_class": type(self).__name__, "model_file": MODEL_FILENAME}
        (out / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # --------------------------------------------------------------------- encoding

    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of ``text`` without [CLS]/[SEP] (``▁`` marks a word start)."""
        return self._sp.encode(text, out_type=str)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Map pieces to ids; unknown pieces map to [UNK]."""
        unk = self.unk_id
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Inverse of :meth:`convert_tokens_to_ids` (an id out of range is an IndexError)."""
        n = self.vocab_size
        out = []
        for i in np.asarray(ids).reshape(-1):
            if not 0 <= int(i) < n:
                raise IndexError(f"id {int(i)} out of range for vocab_size {n}")
            out.append(self._sp.id_to_piece(int(i)))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Ids back to text; pad/CLS/SEP/MASK are dropped by default."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_special_tokens:
            special = {self.pad_id, self.cls_id, self.sep_id, self.mask_id}
            flat = [i for i in flat if i not in special]
        return self._sp.decode(flat)

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts) if texts else []

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

        Same contract as ``BertTokenizer.__call__``: ``[CLS] a [SEP]`` or
        ``[CLS] a [SEP] b [SEP]`` (type ids 0 / 1), longest-first truncation, ``L = max_length``
        or the longest row, and an error instead of silent clipping with ``truncation=False``.
        """
        batch, second, max_length, n_special = check_batch_inputs(texts, pairs, max_length, padding)

        ids_a = self._encode_ids(batch)
        ids_b = self._encode_ids(second) if second is not None else None
        budget = max_length - n_special
        rows: list[tuple[list[int], int]] = []  # (ids with specials, length of the type-0 part)
        for i, a in enumerate(ids_a):
            b = ids_b[i] if ids_b is not None else None
            n_tokens = len(a) + (len(b) if b is not None else 0)
            if n_tokens > budget:
                if not truncation:
                    raise ValueError(
                        f"row {i} has {n_tokens + n_special} tokens (with [CLS]/[SEP]), more "
                        f"than max_length={max_length}; pass truncation=True or a larger "
                        "max_length"
                    )
                if b is None:
                    a = a[:budget]
                else:
                    len_a, len_b = truncate_pair_lengths(len(a), len(b), budget)
                    a, b = a[:len_a], b[:len_b]
            first = [self.cls_id, *a, self.sep_id]
            rows.append((first + ([*b, self.sep_id] if b is not None else []), len(first)))

        longest = max((len(row) for row, _ in rows), default=0)
        width = max_length if padding == "max_length" else longest
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        token_type_ids = np.zeros((len(rows), width), dtype=np.int32)
        attention_mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, (row, n_first) in enumerate(rows):
            input_ids[i, : len(row)] = row
            token_type_ids[i, n_first : len(row)] = 1
            attention_mask[i, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
        }


# -------------------------------------------------------------------------------------- CLI


def build_parser(prog: str = "python -m bert_mini.tokenization") -> argparse.ArgumentParser:
    """The ``train-spm`` command line (also reachable as ``python -m bert_mini.tokenization``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="bert_mini tokenizer tools: train a SentencePiece vocabulary."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train-spm",
        help="train a SentencePiece model with BERT's special tokens at ids 0-4",
        description=(
            "Train a SentencePiece vocabulary on plain or gzipped text (one sentence or "
            "paragraph per line; blank lines are skipped). [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, "
            "[MASK]=4. Writes PREFIX.model and PREFIX.vocab; load the model with "
            "bert_mini.sentencepiece_tokenizer.SentencePieceTokenizer."
        ),
    )
    train.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="GLOB",
        help="text file or glob (quote it; ** recurses; .gz is read transparently); repeat the "
        "flag for more. Every glob must match at least one file.",
    )
    train.add_argument(
        "--model-prefix",
        required=True,
        metavar="PATH",
        help="output path without extension: writes PATH.model and PATH.vocab "
        "(parent folders are created)",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        default=30522,
        metavar="N",
        help="number of pieces including the 5 special tokens (default: %(default)s, BERT's)",
    )
    train.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="unigram",
        help="segmentation algorithm: unigram language model or byte-pair encoding "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--no-lowercase",
        dest="lowercase",
        action="store_false",
        help="keep case (a cased vocab); by default text is case-folded in training and encoding",
    )
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        metavar="N",
        help="train on a random sample of N lines of the input, to bound time and memory; "
        "0 uses every line (default: %(default)s)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        metavar="F",
        help="fraction of characters the vocab must cover; rarer ones become [UNK] "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed for line sampling (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors are one line on stderr, status 1)."""
    args = build_parser().parse_args(argv)
    if args.command != "train-spm":  # pragma: no cover - argparse rejects other commands
        return 2
    try:
        model_file = train_spm(
            args.input,
            args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            lowercase=args.lowercase,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
        )
    except (OSError, ValueError, RuntimeError) as e:
        message = " ".join(str(e).split())  # SentencePiece errors can span lines
        print(f"train-spm: error: {message}", file=sys.stderr)
        return 1
    tok = SentencePieceTokenizer(model_file)
    print(f"wrote {model_file} ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
