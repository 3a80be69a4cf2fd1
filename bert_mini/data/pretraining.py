"""Unmasked pre-training examples from documents (Google's ``create_pretraining_data.py``, on ids).

Documents are tokenised once, in batches, by the tokenizer's Rust backend into one flat id array
with segment (line) and document boundaries. Examples are then cut from those ids in one of two
ways, both deterministic for a seed:

- ``next_sentence=True`` (BERT): ``[CLS] A [SEP] B [SEP]`` with Google's segment logic. Segments
  (lines) of one document accumulate up to a target length (``max_seq_length - 3``, or with
  probability ``short_seq_prob`` a random shorter one); A is a random prefix of the chunk; B is
  the rest (label 0) or, half the time, text from a random other document (label 1,
  ``is_random_next``), whose unused segments go back to the queue. Pairs are trimmed like
  ``truncate_seq_pair`` (longer side first, random front/back). Two deliberate differences: a
  line longer than the budget is cut into near-equal pieces (Gutenberg lines are whole
  paragraphs; Google's sentences rarely overflow), and a one-segment chunk that draws "actual
  next" is split inside the segment instead of being forced to "random next", so labels are 50/50.
  The short target is drawn per example (Google draws it once per document).
- ``next_sentence=False`` (RoBERTa's FULL-SENTENCES packing): documents, in a seeded random order
  and each followed by ``[SEP]``, form one stream that is cut every ``max_seq_length - 2`` tokens
  into ``[CLS] text [SEP]`` rows, starting at a seeded random offset; only the last row is padded.
  ``short_seq_prob`` defaults to 0 here (pass a value to use it anyway).

Masking is not done here: it is applied per batch in the input pipeline
(``bert_mini.data.masking``), so every epoch sees new masks of the same examples.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from bert_mini.data.corpus import read_documents
from bert_mini.data.sources import require_file
from bert_mini.tokenization import BertTokenizer

# Bump when the example-creation algorithm changes, so cached files are not reused.
_CACHE_FORMAT = 1
_ENCODE_BATCH_LINES = 16_384
_LAYOUT_CHUNK_ROWS = 32_768
DEFAULT_SHORT_SEQ_PROB = 0.1


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """All documents as ids: segment ``i`` is ``ids[segment_starts[i]:segment_starts[i + 1]]``;
    document ``d`` holds segments ``doc_starts[d]:doc_starts[d + 1]``. Empty lines are dropped."""

    ids: np.ndarray
    segment_starts: np.ndarray
    doc_starts: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int

    @classmethod
    def of(cls, tokenizer: BertTokenizer) -> "SpecialIds":
        return cls(cls=tokenizer.cls_id, sep=tokenizer.sep_id, pad=tokenizer.pad_id)


# --------------------------------------------------------------------------- tokenizing


def tokenize_documents(
    documents: Iterable[Sequence[str]], tokenizer: BertTokenizer
) -> TokenizedCorpus:
    """Batch-encode every line without special tokens; documents with no tokens are dropped."""
    rust = tokenizer._tokenizer
    id_chunks: list[np.ndarray] = []
    line_lengths: list[np.ndarray] = []
    doc_line_counts: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        if not pending:
            return
        encodings = rust.encode_batch_fast(pending, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        flat = np.fromiter((i for e in encodings for i in e.ids), np.int32, int(lengths.sum()))
        id_chunks.append(flat)
        line_lengths.append(lengths)
        pending.clear()

    for document in documents:
        doc_line_counts.append(len(document))
        pending.extend(document)
        if len(pending) >= _ENCODE_BATCH_LINES:
            flush()
    flush()

    ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, np.int32)
    lengths = np.concatenate(line_lengths) if line_lengths else np.zeros(0, np.int64)
    line_doc = np.repeat(np.arange(len(doc_line_counts)), doc_line_counts)
    keep = lengths > 0
    lengths, line_doc = lengths[keep], line_doc[keep]
    segment_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Documents that lost all their lines disappear; ids stay dense.
    _, segments_per_doc = np.unique(line_doc, return_counts=True)
    doc_starts = np.concatenate([[0], np.cumsum(segments_per_doc)]).astype(np.int64)
    return TokenizedCorpus(ids=ids, segment_starts=segment_starts, doc_starts=doc_starts)


def split_long_segments(corpus: TokenizedCorpus, max_tokens: int) -> TokenizedCorpus:
    """Cut every segment longer than ``max_tokens`` into near-equal pieces (same ids)."""
    lengths = np.diff(corpus.segment_starts)
    pieces = np.maximum(1, -(-lengths // max_tokens))
    if np.all(pieces == 1):
        return corpus
    starts: list[np.ndarray] = []
    for start, length, count in zip(corpus.segment_starts[:-1], lengths, pieces, strict=True):
        if count == 1:
            starts.append(np.array([start]))
        else:
            starts.append(start + (np.arange(count) * length) // count)
    new_starts = np.concatenate([*starts, [corpus.num_tokens]]).astype(np.int64)
    new_doc_starts = np.concatenate([[0], np.cumsum(pieces)])[corpus.doc_starts].astype(np.int64)
    return TokenizedCorpus(corpus.ids, new_starts, new_doc_starts)


# ----------------------------------------------------------------------- example creation


def create_examples(
    corpus: TokenizedCorpus,
    special: SpecialIds,
    *,
    max_seq_length: int = 128,
    next_sentence: bool = False,
    short_seq_prob: float | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Static-shape int32 arrays ``input_ids``, ``token_type_ids``, ``attention_mask`` [N, L]
    (and ``next_sentence_label`` [N] with ``next_sentence``), rows in a seeded random order."""
    if corpus.num_tokens == 0:
        raise ValueError("the corpus has no tokens: nothing to make examples from")
    if next_sentence:
        if max_seq_length < 5:
            raise ValueError(f"max_seq_length={max_seq_length}: pairs need at least 5 positions")
        if corpus.num_documents < 2:
            raise ValueError("next-sentence pairs need at least 2 documents for random B segments")
        prob = DEFAULT_SHORT_SEQ_PROB if short_seq_prob is None else short_seq_prob
        return _nsp_examples(corpus, special, max_seq_length, prob, seed)
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length={max_seq_length}: need at least 3 positions")
    return _packed_examples(corpus, special, max_seq_length, short_seq_prob or 0.0, seed)


def create_pretraining_examples(
    documents: Iterable[Sequence[str]],
    tokenizer: BertTokenizer,
    *,
    max_seq_length: int = 128,
    next_sentence: bool = False,
    short_seq_prob: float | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Tokenise ``documents`` (lists of lines) and cut them into examples (see module doc)."""
    corpus = tokenize_documents(documents, tokenizer)
    return create_examples(
        corpus,
        SpecialIds.of(tokenizer),
        max_seq_length=max_seq_length,
        next_sentence=next_sentence,
        short_seq_prob=short_seq_prob,
        seed=seed,
    )


def _packed_examples(
    corpus: TokenizedCorpus, special: SpecialIds, max_seq_length: int, short_prob: float, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    token_starts = corpus.segment_starts[corpus.doc_starts]
    order = rng.permutation(corpus.num_documents)
    separator = np.array([special.sep], np.int32)
    parts: list[np.ndarray] = []
    for d in order:
        parts.append(corpus.ids[token_starts[d] : token_starts[d + 1]])
        parts.append(separator)
    stream = np.concatenate(parts)
    # Drop the final [SEP]: each row ends with its own; then rotate so row borders move per seed.
    stream = stream[:-1]
    body = max_seq_length - 2
    stream = np.roll(stream, -int(rng.integers(0, min(body, len(stream)))))

    row_lengths = _packed_row_lengths(len(stream), body, short_prob, rng)
    row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
    shuffle = rng.permutation(len(row_lengths))
    row_lengths, row_starts = row_lengths[shuffle], row_starts[shuffle]

    rows = len(row_lengths)
    positions = np.arange(body)[None, :]
    input_ids = np.empty((rows, max_seq_length), np.int32)
    input_ids[:, 0] = special.cls
    for lo in range(0, rows, _LAYOUT_CHUNK_ROWS):  # chunks bound the [rows, L] temporaries
        part = slice(lo, min(rows, lo + _LAYOUT_CHUNK_ROWS))
        take = positions < row_lengths[part, None]
        source = np.where(take, row_starts[part, None] + positions, 0)
        input_ids[part, 1 : 1 + body] = np.where(take, stream[source], special.pad)
    input_ids[:, -1] = special.pad
    input_ids[np.arange(rows), 1 + row_lengths] = special.sep
    attention_mask = (np.arange(max_seq_length)[None, :] < (row_lengths + 2)[:, None]).astype(
        np.int32
    )
    return {
        "input_ids": input_ids,
        "token_type_ids": np.zeros_like(input_ids),
        "attention_mask": attention_mask,
    }


def _packed_row_lengths(
    total: int, body: int, short_prob: float, rng: np.random.Generator
) -> np.ndarray:
    """Row lengths covering ``total`` tokens: ``body`` each, or a random shorter one."""
    if short_prob <= 0:
        full, rest = divmod(total, body)
        return np.array([body] * full + ([rest] if rest else []), np.int64)
    lengths: list[int] = []
    covered = 0
    while covered < total:
        length = int(rng.integers(1, body + 1)) if rng.random() < short_prob else body
        length = min(length, total - covered)
        lengths.append(length)
        covered += length
    return np.array(lengths, np.int64)


def _nsp_examples(
    corpus: TokenizedCorpus, special: SpecialIds, max_seq_length: int, short_prob: float, seed: int
) -> dict[str, np.ndarray]:
    max_tokens = max_seq_length - 3
    corpus = split_long_segments(corpus, max_tokens)
    rng = np.random.default_rng([seed, 1])
    ids = corpus.ids
    seg_start = corpus.segment_starts.tolist()
    doc_start = corpus.doc_starts.tolist()
    num_docs = corpus.num_documents
    pairs: list[tuple[np.ndarray, np.ndarray, bool]] = []

    def tokens(first: int, last: int) -> np.ndarray:
        """Ids of segments ``first..last-1`` (contiguous in ``ids``)."""
        return ids[seg_start[first] : seg_start[last]]

    for doc in range(num_docs):
        lo, hi = doc_start[doc], doc_start[doc + 1]
        target = _target_length(max_tokens, short_prob, rng)
        chunk_lo, length, i = lo, 0, lo
        while i < hi:
            length += seg_start[i + 1] - seg_start[i]
            if i == hi - 1 or length >= target:
                n_chunk = i + 1 - chunk_lo
                a_end = chunk_lo + (1 if n_chunk < 2 else int(rng.integers(1, n_chunk)))
                tokens_a = tokens(chunk_lo, a_end)
                random_next = rng.random() < 0.5
                if not random_next and n_chunk == 1:
                    if len(tokens_a) < 2:
                        random_next = True  # nothing to split: Google's forced random B
                    else:
                        cut = int(rng.integers(1, len(tokens_a)))
                        tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
                elif not random_next:
                    tokens_b = tokens(a_end, i + 1)
                if random_next:
                    tokens_b = _random_b(
                        rng, doc, num_docs, doc_start, seg_start, ids, target - len(tokens_a)
                    )
                    i = a_end - 1  # unused segments of this chunk go back to the queue
                pairs.append((*_truncate_pair(tokens_a, tokens_b, max_tokens, rng), random_next))
                chunk_lo, length = i + 1, 0
                target = _target_length(max_tokens, short_prob, rng)
            i += 1

    return _pairs_to_arrays(pairs, special, max_seq_length, rng)


def _target_length(max_tokens: int, short_prob: float, rng: np.random.Generator) -> int:
    if short_prob > 0 and rng.random() < short_prob:
        return int(rng.integers(2, max_tokens + 1))
    return max_tokens


def _random_b(
    rng: np.random.Generator,
    doc: int,
    num_docs: int,
    doc_start: list[int],
    seg_start: list[int],
    ids: np.ndarray,
    target_b: int,
) -> np.ndarray:
    """Consecutive segments of another document, from a random segment, up to ``target_b``."""
    other = doc
    for _ in range(10):
        other = int(rng.integers(0, num_docs))
        if other != doc:
            break
    lo, hi = doc_start[other], doc_start[other + 1]
    first = int(rng.integers(lo, hi))
    last = first + 1
    while last < hi and seg_start[last] - seg_start[first] < target_b:
        last += 1
    return ids[seg_start[first] : seg_start[last]]


def truncation_counts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """How many tokens ``truncate_seq_pair`` removes from A and from B, in closed form.

    Google's loop removes one token at a time from the longer side (B on ties) until the pair
    fits: first the longer side down to the shorter, then alternately.
    """
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, 0
    if len_a > len_b:
        first = min(excess, len_a - len_b)  # from A until equal (a tie then goes to B)
        rest = excess - first
        return first + rest // 2, (rest + 1) // 2
    first = min(excess, len_b - len_a + 1)  # from B until A is longer by one
    rest = excess - first
    return (rest + 1) // 2, first + rest // 2


def _truncate_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``truncate_seq_pair``: each removal is from the front or back with probability 1/2."""
    cut_a, cut_b = truncation_counts(len(tokens_a), len(tokens_b), max_tokens)
    if cut_a:
        front = int(rng.binomial(cut_a, 0.5))
        tokens_a = tokens_a[front : len(tokens_a) - (cut_a - front)]
    if cut_b:
        front = int(rng.binomial(cut_b, 0.5))
        tokens_b = tokens_b[front : len(tokens_b) - (cut_b - front)]
    return tokens_a, tokens_b


def _pairs_to_arrays(
    pairs: list[tuple[np.ndarray, np.ndarray, bool]],
    special: SpecialIds,
    max_seq_length: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    rows = len(pairs)
    len_a = np.fromiter((len(a) for a, _, _ in pairs), np.int64, rows)
    len_b = np.fromiter((len(b) for _, b, _ in pairs), np.int64, rows)
    labels = np.fromiter((int(r) for _, _, r in pairs), np.int32, rows)
    flat = np.concatenate([piece for a, b, _ in pairs for piece in (a, b)])
    starts = np.concatenate([[0], np.cumsum(len_a + len_b)[:-1]])
    shuffle = rng.permutation(rows)
    len_a, len_b, starts, labels = len_a[shuffle], len_b[shuffle], starts[shuffle], labels[shuffle]

    out = {
        key: np.empty((rows, max_seq_length), np.int32)
        for key in ("input_ids", "token_type_ids", "attention_mask")
    }
    for lo in range(0, rows, _LAYOUT_CHUNK_ROWS):  # chunks bound the [rows, L] temporaries
        part = slice(lo, min(rows, lo + _LAYOUT_CHUNK_ROWS))
        ids, types, mask = _pair_rows(
            flat, starts[part], len_a[part], len_b[part], special, max_seq_length
        )
        out["input_ids"][part], out["token_type_ids"][part], out["attention_mask"][part] = (
            ids,
            types,
            mask,
        )
    out["next_sentence_label"] = labels
    return out


def _pair_rows(
    flat: np.ndarray,
    starts: np.ndarray,
    len_a: np.ndarray,
    len_b: np.ndarray,
    special: SpecialIds,
    max_seq_length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``[CLS] A [SEP] B [SEP] pad..`` where A, B are ``flat[start:]`` of the given lengths."""
    rows = len(starts)
    pos = np.arange(max_seq_length)[None, :]
    a_end = (1 + len_a)[:, None]  # position of the first [SEP]
    b_end = (2 + len_a + len_b)[:, None]  # position of the second [SEP]
    in_a = (pos >= 1) & (pos < a_end)
    in_text = in_a | ((pos > a_end) & (pos < b_end))
    source = starts[:, None] + pos - np.where(in_a, 1, 2)
    input_ids = np.where(in_text, flat[np.where(in_text, source, 0)], special.pad).astype(np.int32)
    input_ids[:, 0] = special.cls
    input_ids[np.arange(rows), a_end[:, 0]] = special.sep
    input_ids[np.arange(rows), b_end[:, 0]] = special.sep
    token_type_ids = ((pos > a_end) & (pos <= b_end)).astype(np.int32)
    attention_mask = (pos <= b_end).astype(np.int32)
    return input_ids, token_type_ids, attention_mask


# ------------------------------------------------------------------- caching and tf.data


def examples_dataset(examples: Mapping[str, np.ndarray]) -> tf.data.Dataset:
    """One element per example (int32 tensors), ready for shuffling, batching and masking."""
    return tf.data.Dataset.from_tensor_slices({k: np.asarray(v) for k, v in examples.items()})


def save_examples(examples: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Compact ``.npz`` (ids as uint16 when the vocab allows); written atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compact = {}
    for key, values in examples.items():
        if key == "input_ids" and values.size and values.max() < 2**16:
            compact[key] = values.astype(np.uint16)
        elif key != "input_ids":
            compact[key] = values.astype(np.uint8)
        else:
            compact[key] = values
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **compact)
    os.replace(tmp, path)


def load_examples(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """What ``save_examples`` wrote, as int32 arrays."""
    with np.load(path) as data:
        return {key: data[key].astype(np.int32) for key in data.files}


def cached_pretraining_examples(
    paths: Sequence[str | os.PathLike],
    tokenizer: BertTokenizer,
    cache_dir: str | os.PathLike,
    *,
    layout: str = "auto",
    max_seq_length: int = 128,
    next_sentence: bool = False,
    short_seq_prob: float | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``create_pretraining_examples`` over corpus files, cached in ``cache_dir``.

    The cache key covers the files (path, size, mtime), the vocabulary and casing, and every
    option, so a changed input or setting never reuses stale examples.
    """
    options = {
        "format": _CACHE_FORMAT,
        "layout": layout,
        "max_seq_length": max_seq_length,
        "next_sentence": next_sentence,
        "short_seq_prob": short_seq_prob,
        "seed": seed,
        "vocab_sha256": hashlib.sha256(pathlib.Path(tokenizer.vocab_path).read_bytes()).hexdigest(),
        "do_lower_case": tokenizer.do_lower_case,
        "strip_accents": tokenizer.strip_accents,
        "files": [_fingerprint(pathlib.Path(p)) for p in paths],
    }
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = pathlib.Path(cache_dir) / f"pretraining-{max_seq_length}-{key}.npz"
    if cache_file.is_file():
        return load_examples(cache_file)
    examples = create_pretraining_examples(
        read_documents(paths, layout),
        tokenizer,
        max_seq_length=max_seq_length,
        next_sentence=next_sentence,
        short_seq_prob=short_seq_prob,
        seed=seed,
    )
    save_examples(examples, cache_file)
    return examples


def _fingerprint(path: pathlib.Path) -> list:
    stat = require_file(path, "check the corpus path").stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
