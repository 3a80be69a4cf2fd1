"""SQuAD v1.1: a TFDS builder over the official JSON, fine-tuning windows, and the official metric.

The builder reads ``train-v1.1.json`` / ``dev-v1.1.json`` from a local folder and yields exactly
the catalog's ``squad/v1.1`` features, so code written against ``tfds.load("squad/v1.1")`` runs
unchanged on the offline copy (only the dev file is available here).

Windows follow Google's ``run_squad.py``: ``[CLS] question [SEP] context-window [SEP]``, with
the question cut to ``max_query_length`` tokens and the context cut into windows whose starts are
``doc_stride`` tokens apart; ``token_is_max_context`` marks, for every context token, the one
window where it has the most context on both sides (that window's prediction is the one to
trust). Answer positions come from the Rust tokenizer's character offsets (Hugging Face's way)
rather than from whitespace tokens, so a predicted span maps straight back to the exact
substring of the original context.

``normalize_answer``/``exact_match``/``f1_score`` are the official SQuAD v1.1 definitions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds

from bert_mini.data.sources import DataError, prepare, require_file
from bert_mini.paths import shared_data_dir
from bert_mini.tokenization import BertTokenizer

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "SPLIT_FILES",
    "BertMiniSquad",
    "SquadFeatures",
    "SquadWindow",
    "exact_match",
    "f1_score",
    "load_squad",
    "make_squad_windows",
    "normalize_answer",
    "read_squad_json",
    "squad_builder",
    "squad_features",
    "window_span_to_text",
]

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
SPLIT_FILES = {"train": "train-v1.1.json", "validation": "dev-v1.1.json"}
CATALOG_NAME = "squad/v1.1"


def _how_to_get(filename: str, folder: os.PathLike | str) -> str:
    return (
        f"download {SQUAD_URL}{filename} (official SQuAD v1.1, CC BY-SA 4.0) into {folder}; "
        f"or use source='tfds:{CATALOG_NAME}' to let TFDS download it"
    )


# ----------------------------------------------------------------------------- reading JSON


def squad_features() -> tfds.features.FeaturesDict:
    """The catalog's ``squad/v1.1`` features (``qa_utils.squadlike_features``), field for field."""
    return tfds.features.FeaturesDict(
        {
            "id": np.str_,
            "title": tfds.features.Text(),
            "context": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(
                {"text": tfds.features.Text(), "answer_start": np.int32}
            ),
        }
    )


def _get(record: Any, key: str, where: str, path: pathlib.Path, kind: type | tuple) -> Any:
    """``record[key]`` checked for presence and type, else a DataError naming file and place."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}: {where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{path}: {where}: key {key!r} is {type(value).__name__}, expected {names}")
    return value


def read_squad_json(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, example) pairs of a SQuAD v1.1 file, as the catalog's generator yields them.

    Like the catalog, answers of records sharing an id are merged (XTREME-style flattened files).
    Every record is checked so a broken file fails with the file, the key and the question id
    instead of a bare ``KeyError`` deep inside a TFDS build.
    """
    path = pathlib.Path(path)
    try:
        squad = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason})") from None
    articles = _get(squad, "data", "top level", path, list)

    merged: dict[str, dict[str, Any]] = {}
    for a_idx, article in enumerate(articles):
        where = f"data[{a_idx}]"
        paragraphs = _get(article, "paragraphs", where, path, list)
        title = article.get("title", "")
        if not isinstance(title, str):
            raise DataError(f"{path}: {where}: key 'title' is {type(title).__name__}, expected str")
        for p_idx, paragraph in enumerate(paragraphs):
            where = f"data[{a_idx}].paragraphs[{p_idx}] (title {title!r})"
            context = _get(paragraph, "context", where, path, str)
            for q_idx, qa in enumerate(_get(paragraph, "qas", where, path, list)):
                qid = _get(qa, "id", f"{where}.qas[{q_idx}]", path, (str, int))
                qid = str(qid)
                q_where = f"question id {qid!r}"
                question = _get(qa, "question", q_where, path, str)
                texts, starts = [], []
                for n, answer in enumerate(_get(qa, "answers", q_where, path, list)):
                    a_where = f"{q_where} answers[{n}]"
                    texts.append(_get(answer, "text", a_where, path, str))
                    starts.append(_get(answer, "answer_start", a_where, path, int))
                if qid in merged:
                    merged[qid]["answers"]["text"].extend(texts)
                    merged[qid]["answers"]["answer_start"].extend(starts)
                    continue
                merged[qid] = {
                    "id": qid,
                    "title": title,
                    "context": context,
                    "question": question,
                    "answers": {"text": texts, "answer_start": starts},
                }
    yield from merged.items()


# ----------------------------------------------------------------------------- TFDS builder


class BertMiniSquad(tfds.core.GeneratorBasedBuilder):
    """SQuAD v1.1 from local official JSON files; same features and splits as ``squad/v1.1``."""

    DEFAULT_SOURCE = "squad"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SQuAD v1.1 from the official JSON files in manual_dir."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the official SQuAD v1.1 files train-v1.1.json and/or dev-v1.1.json (from "
        f"{SQUAD_URL}train-v1.1.json and {SQUAD_URL}dev-v1.1.json) in manual_dir. Only the "
        "splits whose file is present are built (train-v1.1.json -> train, dev-v1.1.json -> "
        "validation)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Stanford Question Answering Dataset v1.1: questions on Wikipedia paragraphs "
                "whose answers are spans of the paragraph."
            ),
            features=squad_features(),
            supervised_keys=None,
            homepage="https://rajpurkar.github.io/SQuAD-explorer/",
            citation="@inproceedings{rajpurkar-etal-2016-squad, title={SQuAD: 100,000+ "
            "Questions for Machine Comprehension of Text}, author={Rajpurkar, Pranav and "
            "Zhang, Jian and Lopyrev, Konstantin and Liang, Percy}, booktitle={EMNLP}, "
            "year={2016}}",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual_dir = pathlib.Path(dl_manager.manual_dir)
        splits = {
            split: self._generate_examples(manual_dir / filename)
            for split, filename in SPLIT_FILES.items()
            if (manual_dir / filename).is_file()
        }
        if not splits:
            names = " / ".join(SPLIT_FILES.values())
            raise DataError(
                f"no SQuAD v1.1 file ({names}) in {manual_dir} "
                f"({_how_to_get(SPLIT_FILES['validation'], manual_dir)})"
            )
        return splits

    def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from read_squad_json(path)


def _split_names(split: str) -> list[str]:
    """Base split names in a TFDS split string (``"validation[:10%]+train"``)."""
    names = [re.sub(r"\[.*$", "", part).strip() for part in str(split).split("+")]
    for name in names:
        if name not in SPLIT_FILES:
            raise ValueError(f"unknown SQuAD split {name!r} in {split!r}; have {list(SPLIT_FILES)}")
    return names


def squad_builder(
    source_dir: str | os.PathLike | None = None, tfds_dir: str | os.PathLike | None = None
) -> BertMiniSquad:
    """The prepared local builder (built once into ``tfds_dir``, reused afterwards)."""
    return prepare(BertMiniSquad, source_dir=source_dir, tfds_dir=tfds_dir)


def load_squad(
    split: str,
    *,
    source_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    source: str = "local",
    shuffle_files: bool = False,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of SQuAD v1.1 examples (catalog features) for ``split``.

    ``source="local"`` builds :class:`BertMiniSquad` offline from ``source_dir`` (default
    ``../shared/data/squad``); ``source="tfds:squad/v1.1"`` uses the TFDS catalog, which downloads.
    A split whose JSON file is missing is a DataError naming the file and where to get it.
    """
    names = _split_names(split)
    if source.startswith("tfds:"):
        return tfds.load(
            source.removeprefix("tfds:"),
            split=split,
            data_dir=None if tfds_dir is None else str(tfds_dir),
            shuffle_files=shuffle_files,
        )
    if source != "local":
        raise ValueError(f"unknown SQuAD source {source!r}; use 'local' or 'tfds:{CATALOG_NAME}'")

    if source_dir is None:
        folder = shared_data_dir() / BertMiniSquad.DEFAULT_SOURCE
    else:
        folder = pathlib.Path(source_dir)
    for name in names:
        require_file(folder / SPLIT_FILES[name], _how_to_get(SPLIT_FILES[name], folder))
    builder = squad_builder(folder, tfds_dir)
    for name in names:
        if name not in builder.info.splits:
            raise DataError(
                f"the prepared dataset in {builder.data_dir} was built before "
                f"{folder / SPLIT_FILES[name]} existed, so it has no {name!r} split; "
                "delete that folder to rebuild"
            )
    return builder.as_dataset(split=split, shuffle_files=shuffle_files)


# ------------------------------------------------------------------------ fine-tuning windows


@dataclasses.dataclass(frozen=True)
class SquadWindow:
    """One window of one example, with what is needed to turn token positions into text.

    ``offset_mapping[p]`` is the ``(start, end)`` character span in ``context`` of the token at
    sequence position ``p``, or None for [CLS]/question/[SEP]/padding.
    """

    example_index: int
    example_id: str
    context: str
    offset_mapping: list[tuple[int, int] | None]
    token_is_max_context: np.ndarray  # bool [max_seq_length]; False outside the context
    context_position: int  # sequence position of the window's first context token
    doc_start: int  # index of that token among all of the context's tokens
    doc_length: int  # number of context tokens in the window


@dataclasses.dataclass
class SquadFeatures:
    """Windows of a batch of examples as fixed-shape int32 arrays ``[N, max_seq_length]``.

    ``start_positions_N``/``end_positions_N`` exist only for ``training=True``; (0, 0) points at
    [CLS] and means the answer is not fully inside that window.
    """

    input_ids_NxS: np.ndarray
    token_type_ids_NxS: np.ndarray
    attention_mask_NxS: np.ndarray
    example_index_N: np.ndarray
    token_is_max_context_NxS: np.ndarray
    windows: list[SquadWindow]
    start_positions_N: np.ndarray | None = None
    end_positions_N: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def example_ids(self) -> list[str]:
        return [w.example_id for w in self.windows]

    @property
    def offset_mapping(self) -> list[list[tuple[int, int] | None]]:
        return [w.offset_mapping for w in self.windows]

    def arrays(self) -> dict[str, np.ndarray]:
        """The model inputs (and labels when training) keyed as the fine-tuning step expects."""
        out = {
            "input_ids": self.input_ids_NxS,
            "token_type_ids": self.token_type_ids_NxS,
            "attention_mask": self.attention_mask_NxS,
        }
        if self.start_positions_N is not None:
            out["start_positions"] = self.start_positions_N
            out["end_positions"] = self.end_positions_N
        return out


def _text(value: Any) -> str:
    """TFDS numpy gives bytes, the JSON reader str; windows accept both."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _doc_spans(n_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) windows as in run_squad.py: starts ``doc_stride`` apart, last one flush."""
    spans, start = [], 0
    while True:
        length = min(n_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, doc_stride)


def _max_context_owner(spans: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """For each context token, the index of the span where it has the most context.

    Score = min(left, right context) + 0.01 * span length, first span wins ties (run_squad.py's
    ``_check_is_max_context``, vectorised).
    """
    if len(spans) == 1:
        return np.zeros(n_tokens, dtype=np.int64)
    scores = np.full((len(spans), n_tokens), -np.inf)
    for k, (start, length) in enumerate(spans):
        left = np.arange(length)
        scores[k, start : start + length] = np.minimum(left, length - 1 - left) + 0.01 * length
    return np.argmax(scores, axis=0)


def _answer_tokens(
    offsets_Tx2: np.ndarray, answer_start: int, answer_text: str
) -> tuple[int, int] | None:
    """First and last context token overlapping the answer's characters (None if no token does).

    Tokens are found from character offsets, so whitespace at the edges of the answer text is
    ignored and an answer ending inside a word piece takes the whole piece (as run_squad.py's
    token-level labels do).
    """
    if offsets_Tx2.shape[0] == 0:
        return None
    answer_end = answer_start + len(answer_text)
    first = int(np.searchsorted(offsets_Tx2[:, 1], answer_start, side="right"))
    last = int(np.searchsorted(offsets_Tx2[:, 0], answer_end, side="left")) - 1
    return (first, last) if first <= last else None


def make_squad_windows(
    examples: Iterable[Mapping[str, Any]],
    tokenizer: BertTokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    *,
    training: bool,
) -> SquadFeatures:
    """Cut examples into ``[CLS] question [SEP] context-window [SEP]`` windows (run_squad.py).

    ``examples`` are catalog-style records (``id``, ``question``, ``context``, ``answers``
    with ``text``/``answer_start``), as str (JSON reader) or bytes (``tfds.as_numpy``). With
    ``training=True`` each window is labelled with the first answer's token positions, or (0, 0)
    when it is not fully inside that window. Tokenization runs in one Rust batch per field.
    """
    examples = list(examples)
    if doc_stride < 1 or max_query_length < 1:
        raise ValueError(
            f"doc_stride={doc_stride} and max_query_length={max_query_length} must be >= 1"
        )
    rust = tokenizer._tokenizer
    questions = [_text(ex["question"]) for ex in examples]
    contexts = [_text(ex["context"]) for ex in examples]
    unique_contexts = list(dict.fromkeys(contexts))  # paragraphs repeat across questions
    q_encodings = rust.encode_batch(questions, add_special_tokens=False)
    c_encodings = dict(
        zip(
            unique_contexts,
            rust.encode_batch(unique_contexts, add_special_tokens=False),
            strict=True,
        )
    )

    rows: list[tuple[int, list[int], list[int], tuple[int, int], int, int]] = []
    windows: list[SquadWindow] = []
    max_flags: list[np.ndarray] = []
    seq = max_seq_length
    for ex_idx, (ex, q_enc, context) in enumerate(
        zip(examples, q_encodings, contexts, strict=True)
    ):
        q_ids = q_enc.ids[:max_query_length]
        c_enc = c_encodings[context]
        c_ids, c_offsets = c_enc.ids, c_enc.offsets
        max_doc_tokens = seq - len(q_ids) - 3
        if max_doc_tokens < 1:
            raise ValueError(
                f"max_seq_length={seq} leaves no room for context after a {len(q_ids)}-token "
                f"question (max_query_length={max_query_length}); raise max_seq_length"
            )
        spans = _doc_spans(len(c_ids), max_doc_tokens, doc_stride)
        owner = _max_context_owner(spans, len(c_ids))
        answer_tokens = None
        if training:
            answers = ex["answers"]
            if len(answers["text"]) > 0:
                answer_tokens = _answer_tokens(
                    np.asarray(c_offsets, dtype=np.int64).reshape(-1, 2),
                    int(answers["answer_start"][0]),
                    _text(answers["text"][0]),
                )
        cpos = len(q_ids) + 2
        ex_id = _text(ex["id"])
        for k, (start, length) in enumerate(spans):
            label = (0, 0)
            if answer_tokens is not None:
                first, last = answer_tokens
                if start <= first and last < start + length:
                    label = (first - start + cpos, last - start + cpos)
            rows.append((ex_idx, q_ids, c_ids[start : start + length], label, cpos, length))
            flags = np.zeros(seq, dtype=bool)
            flags[cpos : cpos + length] = owner[start : start + length] == k
            max_flags.append(flags)
            offsets: list[tuple[int, int] | None] = [None] * seq
            offsets[cpos : cpos + length] = c_offsets[start : start + length]
            windows.append(SquadWindow(ex_idx, ex_id, context, offsets, flags, cpos, start, length))

    n = len(rows)
    input_ids = np.full((n, seq), tokenizer.pad_id, dtype=np.int32)
    type_ids = np.zeros((n, seq), dtype=np.int32)
    mask = np.zeros((n, seq), dtype=np.int32)
    positions = np.zeros((n, 2), dtype=np.int32)
    cls_id, sep_id = tokenizer.cls_id, tokenizer.sep_id
    for i, (_, q_ids, doc_ids, label, cpos, length) in enumerate(rows):
        total = cpos + length + 1
        input_ids[i, :total] = [cls_id, *q_ids, sep_id, *doc_ids, sep_id]
        type_ids[i, cpos:total] = 1
        mask[i, :total] = 1
        positions[i] = label
    return SquadFeatures(
        input_ids_NxS=input_ids,
        token_type_ids_NxS=type_ids,
        attention_mask_NxS=mask,
        example_index_N=np.array([r[0] for r in rows], dtype=np.int32),
        token_is_max_context_NxS=np.stack(max_flags) if max_flags else np.zeros((0, seq), bool),
        windows=windows,
        start_positions_N=positions[:, 0].copy() if training else None,
        end_positions_N=positions[:, 1].copy() if training else None,
    )


def window_span_to_text(window: SquadWindow, start_token: int, end_token: int) -> str:
    """The original-context substring covered by sequence positions ``start..end`` (inclusive)."""
    offsets = window.offset_mapping
    for name, pos in (("start_token", start_token), ("end_token", end_token)):
        if not 0 <= pos < len(offsets) or offsets[pos] is None:
            raise ValueError(f"{name}={pos} is not a context token of this window")
    if start_token > end_token:
        raise ValueError(f"start_token={start_token} is after end_token={end_token}")
    return window.context[offsets[start_token][0] : offsets[end_token][1]]


# ------------------------------------------------------------------- official SQuAD v1.1 metric

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official v1.1 order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _ground_truth_list(ground_truths: str | Sequence[str]) -> list[str]:
    truths = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not truths:
        raise ValueError("ground_truths is empty; SQuAD v1.1 questions all have answers")
    return truths


def _f1_single(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(t) for t in _ground_truth_list(ground_truths)))


def f1_score(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 over the ground truths (official v1.1: 0 when nothing overlaps)."""
    return max(_f1_single(prediction, t) for t in _ground_truth_list(ground_truths))
