"""GLUE from local GLUE-format TSV folders as a TFDS builder, and fine-tuning features.

The builder (``BertMiniGlue``, one config per task) yields exactly the features, label names and
split names of the TFDS catalog's ``glue/<task>``, so ``load_glue("sst2", ...)`` (local files,
offline) and ``load_glue("tfds:glue/sst2", ...)`` (catalog, downloads) are interchangeable for the
rest of the pipeline.

GLUE TSVs are not CSV: sentences hold bare ``"`` characters, so lines are split on tabs with no
quoting. Other quirks handled here (see ``shared/data/SOURCES.md``): a UTF-8 BOM before the MRPC
header, CoLA train/dev without a header, files without a final newline, string labels
(``entailment``) next to integer ones, STS-B float scores, test splits without labels (label -1),
and headers with extra columns (``index``, STS-B's genre/filename/...), which is why columns are
found by header name wherever a header exists. ``idx`` is the data row's position in its file, as
in the catalog.

A malformed row (wrong column count, a label outside the task's label set, an unparsable score)
is a ``DataError`` naming ``FILE:LINE``, unless the caller asked for ``skip_bad_rows``; then it is
skipped, counted, logged, and the count is kept in ``builder.info.metadata["skipped_rows"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bert_mini.data.sources import DataError, default_tfds_dir, prepare
from bert_mini.paths import shared_data_dir

__all__ = [
    "GLUE_TASKS",
    "BertMiniGlue",
    "GlueRows",
    "GlueTask",
    "NoHeader",
    "encode_glue",
    "glue_task",
    "load_glue",
    "read_glue_rows",
]

log = logging.getLogger(__name__)

GLUE_URL = "https://gluebenchmark.com/tasks"
CATALOG_PREFIX = "tfds:"
# Rows handed to the Rust tokenizer per call: big enough to use its threads, small enough that
# the per-row Python Encoding objects held at once stay bounded.
_ENCODE_CHUNK = 8192
_MAX_REASONS_LOGGED = 3


@dataclasses.dataclass(frozen=True)
class NoHeader:
    """Layout of a file without a header: its column count and 0-based column positions."""

    n_columns: int
    positions: Mapping[str, int]  # feature name (or "label") -> column


@dataclasses.dataclass(frozen=True, eq=False)
class GlueTask:
    """One GLUE task: where its files are and how to turn their rows into catalog features.

    ``text_features`` maps each catalog feature name to its header column, in segment order (the
    first is BERT's segment A). ``label_names`` is None for regression (float label).
    """

    name: str
    folder: str
    text_features: Mapping[str, str]
    label_column: str
    label_names: tuple[str, ...] | None
    splits: Mapping[str, str]  # catalog split name -> file name in the task folder
    no_header: Mapping[str, NoHeader] = dataclasses.field(default_factory=dict)
    label_range: tuple[float, float] | None = None
    description: str = ""

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_features) == 2

    def label_dtype(self) -> type:
        return np.float32 if self.is_regression else np.int32

    def missing_label(self) -> float | int:
        """The label of an unlabelled (test) row, as in the catalog."""
        return -1.0 if self.is_regression else -1


_TRAIN_DEV_TEST = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_NLI2 = ("entailment", "not_entailment")


def _task(**kwargs: Any) -> GlueTask:
    kwargs.setdefault("splits", _TRAIN_DEV_TEST)
    return GlueTask(**kwargs)


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        _task(
            name="cola",
            folder="CoLA",
            text_features={"sentence": "sentence"},
            label_column="label",
            label_names=("unacceptable", "acceptable"),
            # CoLA train/dev: `source \t label \t original_mark \t sentence`, no header.
            no_header={
                "train": NoHeader(4, {"sentence": 3, "label": 1}),
                "validation": NoHeader(4, {"sentence": 3, "label": 1}),
            },
            description="Corpus of Linguistic Acceptability (Warstadt et al.): grammatical or not.",
        ),
        _task(
            name="sst2",
            folder="SST-2",
            text_features={"sentence": "sentence"},
            label_column="label",
            label_names=("negative", "positive"),
            description="Stanford Sentiment Treebank, binary sentence sentiment.",
        ),
        _task(
            name="mrpc",
            folder="MRPC",
            text_features={"sentence1": "#1 String", "sentence2": "#2 String"},
            label_column="Quality",
            label_names=("not_equivalent", "equivalent"),
            description="Microsoft Research Paraphrase Corpus: are the two sentences paraphrases?",
        ),
        _task(
            name="qqp",
            folder="QQP",
            text_features={"question1": "question1", "question2": "question2"},
            label_column="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            description="Quora Question Pairs: do the two questions ask the same thing?",
        ),
        _task(
            name="stsb",
            folder="STS-B",
            text_features={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="score",
            label_names=None,
            label_range=(0.0, 5.0),
            description="Semantic Textual Similarity Benchmark: similarity score in [0, 5].",
        ),
        _task(
            name="mnli",
            folder="MNLI",
            text_features={"premise": "sentence1", "hypothesis": "sentence2"},
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            splits={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
                "test_matched": "test_matched.tsv",
                "test_mismatched": "test_mismatched.tsv",
            },
            description="Multi-Genre NLI (matched and mismatched dev/test).",
        ),
        _task(
            name="mnli_mismatched",
            folder="MNLI",
            text_features={"premise": "sentence1", "hypothesis": "sentence2"},
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            splits={"validation": "dev_mismatched.tsv", "test": "test_mismatched.tsv"},
            description="MNLI mismatched validation and test splits.",
        ),
        _task(
            name="mnli_matched",
            folder="MNLI",
            text_features={"premise": "sentence1", "hypothesis": "sentence2"},
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            splits={"validation": "dev_matched.tsv", "test": "test_matched.tsv"},
            description="MNLI matched validation and test splits.",
        ),
        _task(
            name="qnli",
            folder="QNLI",
            text_features={"question": "question", "sentence": "sentence"},
            label_column="label",
            label_names=_NLI2,
            description="Question NLI (from SQuAD): does the sentence answer the question?",
        ),
        _task(
            name="rte",
            folder="RTE",
            text_features={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="label",
            label_names=_NLI2,
            description="Recognizing Textual Entailment (RTE1-3, 5), two classes.",
        ),
        _task(
            name="wnli",
            folder="WNLI",
            text_features={"sentence1": "sentence1", "sentence2": "sentence2"},
            label_column="label",
            label_names=("not_entailment", "entailment"),
            description="Winograd NLI: does the sentence with the pronoun substituted follow?",
        ),
    )
}

# Other spellings people use for the same task (GLUE folder names, dashes, case).
_ALIASES: dict[str, str] = {}
for _t in GLUE_TASKS.values():  # first task per folder: MNLI -> mnli, not mnli_matched
    _ALIASES.setdefault(_t.folder.lower().replace("-", ""), _t.name)


def glue_task(task: str | GlueTask) -> GlueTask:
    """Look up a task by catalog name (``sst2``), ``glue/sst2`` or GLUE folder name (``SST-2``)."""
    if isinstance(task, GlueTask):
        return task
    key = task.removeprefix("glue/").lower().replace("-", "")
    if key not in GLUE_TASKS:
        key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def how_to_get(task: GlueTask) -> str:
    """One line on where a missing GLUE file comes from."""
    return (
        f"download GLUE from {GLUE_URL} (e.g. with download_glue_data.py) and put the "
        f"{task.folder}/ folder of TSV files in the GLUE source folder, or load the catalog "
        f"copy with task='{CATALOG_PREFIX}glue/{task.name}' (downloads)"
    )


# --------------------------------------------------------------------------- TSV parsing


class GlueRows(NamedTuple):
    """Rows of one split as catalog feature dicts, and how many bad rows were skipped."""

    rows: list[dict[str, Any]]
    skipped: int


class _BadRow(Exception):
    """A row that does not fit the task; becomes DataError or a skip."""


def _split_lines(path: pathlib.Path) -> list[str]:
    """Decoded lines split on LF only (text may hold other Unicode line breaks).

    A BOM before the header is dropped; a missing final newline loses nothing; a CR before
    the LF (CRLF files) is dropped.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _label_parser(task: GlueTask):
    """A function from the raw label string to the catalog's label value (or _BadRow)."""
    if task.is_regression:
        low, high = task.label_range or (-math.inf, math.inf)

        def parse_float(raw: str) -> float:
            try:
                value = float(raw)
            except ValueError:
                raise _BadRow(f"{task.label_column} {raw!r} is not a number") from None
            if not (math.isfinite(value) and low <= value <= high):
                raise _BadRow(f"{task.label_column} {raw!r} is outside [{low:g}, {high:g}]")
            return value

        return parse_float

    names = task.label_names or ()
    # Class names, and the integer indices GLUE writes for CoLA/SST-2/MRPC/QQP/WNLI.
    lookup = {name: i for i, name in enumerate(names)} | {str(i): i for i in range(len(names))}

    def parse_class(raw: str) -> int:
        try:
            return lookup[raw]
        except KeyError:
            allowed = ", ".join([*names, *map(str, range(len(names)))])
            raise _BadRow(
                f"label {raw!r} is not one of the {task.name} labels ({allowed})"
            ) from None

    return parse_class


def _column_positions(
    task: GlueTask, split: str, path: pathlib.Path, lines: list[str]
) -> tuple[int, dict[str, int], int]:
    """(columns per row, feature -> column position, index of the first data line).

    The label position is absent when the file has no label column (test splits).
    """
    if split in task.no_header:
        layout = task.no_header[split]
        return layout.n_columns, dict(layout.positions), 0
    if not lines:
        raise DataError(f"{path}:1: empty file; expected a header line")
    header = lines[0].split("\t")
    where = {}
    for i, name in enumerate(header):
        where.setdefault(name, i)
    needed = list(task.text_features.items())
    if task.label_column in where or not split.startswith("test"):
        needed.append(("label", task.label_column))
    missing = [column for _, column in needed if column not in where]
    if missing:
        raise DataError(
            f"{path}:1: header has no column {', '.join(map(repr, missing))} "
            f"(header: {', '.join(map(repr, header))})"
        )
    return len(header), {feature: where[column] for feature, column in needed}, 1


def read_glue_rows(
    task: str | GlueTask,
    split: str,
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
) -> GlueRows:
    """Parse one GLUE TSV into catalog feature dicts ``{text..., label, idx}``.

    Pure (no TFDS), so the quirks are testable on their own. Text is kept byte for byte
    (leading/trailing spaces and bare quotes included). A bad row raises ``DataError`` with
    ``FILE:LINE`` (1-based), or with ``skip_bad_rows`` is skipped and counted; ``idx`` keeps
    counting skipped rows, so it always points at the row's place in the file.
    """
    task = glue_task(task)
    if split not in task.splits:
        raise ValueError(
            f"glue/{task.name} has no split {split!r}; known: {', '.join(task.splits)}"
        )
    path = pathlib.Path(path)
    lines = _split_lines(path)
    n_columns, positions, first = _column_positions(task, split, path, lines)
    label_at = positions.pop("label", None)
    parse_label = _label_parser(task)
    text_at = list(positions.items())

    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    for idx, line in enumerate(lines[first:]):
        line_no = first + idx + 1
        fields = line.split("\t")
        try:
            if len(fields) != n_columns:
                raise _BadRow(f"expected {n_columns} tab-separated columns, found {len(fields)}")
            row: dict[str, Any] = {feature: fields[i] for feature, i in text_at}
            row["label"] = (
                task.missing_label() if label_at is None else parse_label(fields[label_at])
            )
            row["idx"] = idx
        except _BadRow as e:
            message = f"{path}:{line_no}: {e}"
            if not skip_bad_rows:
                raise DataError(
                    f"{message} (pass skip_bad_rows=True to skip and count such rows)"
                ) from None
            reasons.append(message)
            continue
        rows.append(row)
    if reasons:
        log.warning(
            "skipped %d bad rows of %s (glue/%s %s), e.g. %s",
            len(reasons),
            path,
            task.name,
            split,
            "; ".join(reasons[:_MAX_REASONS_LOGGED]),
        )
    return GlueRows(rows, len(reasons))


# --------------------------------------------------------------------------- TFDS builder


class BertMiniGlueConfig(tfds.core.BuilderConfig):
    """One GLUE task; the name is the catalog's config name (``sst2``)."""

    def __init__(self, *, task: GlueTask, **kwargs: Any) -> None:
        super().__init__(name=task.name, description=task.description, **kwargs)
        self.task = task


class BertMiniGlue(tfds.core.GeneratorBasedBuilder):
    """GLUE tasks read from local GLUE TSVs, with the catalog's features and split names.

    Only splits whose file exists are generated (a task with no file at all is a DataError).
    ``skip_bad_rows=True`` (e.g. ``prepare(BertMiniGlue, config="qqp", skip_bad_rows=True)``)
    skips malformed rows instead of failing; counts per split land in
    ``info.metadata["skipped_rows"]``. A finished build is reused as is, whatever the flag.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "GLUE from local GLUE TSV folders."}
    BUILDER_CONFIGS = [BertMiniGlueConfig(task=t) for t in GLUE_TASKS.values()]
    DEFAULT_SOURCE = "glue"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    The data is the GLUE benchmark from gluebenchmark.com ({GLUE_URL}; e.g. fetched with
    download_glue_data.py). Put each task's folder of original GLUE TSV files in the manual
    folder (default: ../shared/data/glue), e.g. SST-2/train.tsv, SST-2/dev.tsv, SST-2/test.tsv,
    CoLA/..., MRPC/..., QQP/..., STS-B/..., MNLI/{{train,dev_matched,dev_mismatched,
    test_matched,test_mismatched}}.tsv, QNLI/..., RTE/..., WNLI/....
    """

    def __init__(self, *, skip_bad_rows: bool = False, **kwargs: Any) -> None:
        self.skip_bad_rows = bool(skip_bad_rows)
        super().__init__(**kwargs)
        self._original_state["skip_bad_rows"] = self.skip_bad_rows  # survive pickling

    @property
    def task(self) -> GlueTask:
        return self.builder_config.task

    def _info(self) -> tfds.core.DatasetInfo:
        task = self.task
        features: dict[str, Any] = {name: tfds.features.Text() for name in task.text_features}
        if task.is_regression:
            features["label"] = np.float32
        else:
            features["label"] = tfds.features.ClassLabel(names=list(task.label_names))
        features["idx"] = np.int32
        return self.dataset_info_from_configs(
            description="GLUE (gluebenchmark.com) from local GLUE TSV files.",
            features=tfds.features.FeaturesDict(features),
            homepage="https://gluebenchmark.com/",
            metadata=tfds.core.MetadataDict(skipped_rows={}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        task = self.task
        try:
            folder = pathlib.Path(dl_manager.manual_dir) / task.folder
        except AssertionError as e:  # TFDS: manual dir missing or empty
            raise DataError(
                f"GLUE source folder missing or empty ({e}); {how_to_get(task)}"
            ) from None
        files = {split: folder / name for split, name in task.splits.items()}
        present = {split: path for split, path in files.items() if path.is_file()}
        if not present:
            expected = ", ".join(str(p) for p in files.values())
            raise DataError(
                f"no glue/{task.name} files found (expected {expected}); {how_to_get(task)}"
            )
        for split in files.keys() - present.keys():
            log.info("glue/%s: no %s, so no %s split", task.name, files[split], split)
        return {split: self._generate_examples(path, split) for split, path in present.items()}

    def _generate_examples(self, path: pathlib.Path, split: str):
        rows, skipped = read_glue_rows(self.task, split, path, self.skip_bad_rows)
        self.info.metadata["skipped_rows"][split] = skipped
        for row in rows:
            yield row["idx"], row


# --------------------------------------------------------------------------- loading


def _split_names(split: Any) -> list[str] | None:
    """``["train", "validation"]`` from ``"train[:10%]+validation"``; None for non-strings
    (``tfds.core.ReadInstruction``), which TFDS checks itself."""
    if not isinstance(split, str):
        return None
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _check_split(spec: GlueTask, split: Any) -> list[str]:
    """The split names ``split`` reads, each one of the task's (else a ValueError)."""
    names = _split_names(split)
    for name in names or ():
        if name not in spec.splits:
            known = ", ".join(spec.splits)
            raise ValueError(f"glue/{spec.name} has no split {name!r}; known: {known}")
    return names or []


def load_glue(
    task: str,
    split: Any,
    *,
    source_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
) -> tf.data.Dataset:
    """A GLUE split as a ``tf.data.Dataset`` of catalog feature dicts, in TFDS's stored order.

    ``task``: ``sst2`` / ``glue/sst2`` builds (once) from local TSVs (``source_dir``, default
    ``../shared/data/glue``) into ``tfds_dir``; ``tfds:glue/sst2`` uses the TFDS catalog
    (``tfds.load``, which downloads). ``split`` is a catalog split name, optionally sliced or
    joined (``train[:10%]``, ``train+validation``). When a wanted split's local file is missing
    (MNLI, QQP, QNLI train here), the whole request comes from the catalog instead
    (``downloads.glue_tfds``, downloads once); if that fails, a DataError names the TSV to place.
    """
    from bert_mini.downloads import glue_tfds  # here: downloads imports this module lazily

    if task.startswith(CATALOG_PREFIX):
        spec = glue_task(task.removeprefix(CATALOG_PREFIX))
        _check_split(spec, split)
        return glue_tfds(spec.name, split, tfds_dir, source_dir=source_dir)

    spec = glue_task(task)
    wanted = _check_split(spec, split)
    source = pathlib.Path(source_dir or shared_data_dir() / BertMiniGlue.DEFAULT_SOURCE)
    tfds_path = pathlib.Path(tfds_dir or default_tfds_dir())
    builder = BertMiniGlue(data_dir=str(tfds_path), config=spec.name, skip_bad_rows=skip_bad_rows)
    if not (builder.is_prepared() and all(name in builder.info.splits for name in wanted)):
        missing = [source / spec.folder / spec.splits[n] for n in wanted]
        missing = [path for path in missing if not path.is_file()]
        if missing:
            log.info("glue/%s: %s not found; using the TFDS catalog", spec.name, missing[0])
            return glue_tfds(spec.name, split, tfds_path, source_dir=source)
        builder = prepare(
            BertMiniGlue, source, tfds_path, config=spec.name, skip_bad_rows=skip_bad_rows
        )
        for name in wanted:
            if name not in builder.info.splits:
                added = source / spec.folder / spec.splits[name]
                raise DataError(
                    f"{builder.data_dir} was prepared before {added} existed, so it has no "
                    f"{name} split; delete that folder to rebuild"
                )
    return builder.as_dataset(split=split, shuffle_files=False)


# --------------------------------------------------------------------------- features


def _as_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _columns(
    examples: Iterable[Mapping[str, Any]] | tf.data.Dataset, task: GlueTask
) -> tuple[list[list[str]], list[Any], list[int]]:
    """Texts per segment, labels and idx of every example, in order."""
    names = list(task.text_features)
    texts: list[list[str]] = [[] for _ in names]
    labels: list[Any] = []
    idx: list[int] = []
    if isinstance(examples, tf.data.Dataset):
        for batch in examples.batch(4096).as_numpy_iterator():
            for column, name in zip(texts, names, strict=True):
                column.extend(t.decode("utf-8") for t in batch[name])
            labels.extend(batch["label"].tolist())
            idx.extend(batch["idx"].tolist())
        return texts, labels, idx
    for n, example in enumerate(examples):
        try:
            for column, name in zip(texts, names, strict=True):
                column.append(_as_text(example[name]))
            labels.append(np.asarray(example["label"]).item())
            idx.append(int(np.asarray(example["idx"]).item()))
        except KeyError as e:
            raise ValueError(
                f"example {n} has no {e.args[0]!r} feature (glue/{task.name} examples need "
                f"{', '.join([*names, 'label', 'idx'])})"
            ) from None
    return texts, labels, idx


def encode_glue(
    examples: Iterable[Mapping[str, Any]] | tf.data.Dataset,
    task: str | GlueTask,
    tokenizer: Any,
    max_length: int = 128,
) -> dict[str, np.ndarray]:
    """Tokenize GLUE examples into fixed-shape fine-tuning arrays.

    Returns int32 ``input_ids``/``token_type_ids``/``attention_mask`` [N, max_length], ``label``
    (int32, float32 for STS-B) and ``idx`` (int32). Pair tasks become ``[CLS] a [SEP] b [SEP]``
    truncated longest-first by the tokenizer; texts go to it in large batches because one Rust
    batch call is orders of magnitude faster than a call per example.
    """
    task = glue_task(task)
    texts, labels, idx = _columns(examples, task)
    first, second = texts[0], (texts[1] if task.is_pair else None)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(first), _ENCODE_CHUNK):
        stop = start + _ENCODE_CHUNK
        pairs = None if second is None else second[start:stop]
        parts.append(tokenizer(first[start:stop], pairs, max_length=max_length))
    if not parts:
        parts.append(tokenizer([], None, max_length=max_length))
    keys = ("input_ids", "token_type_ids", "attention_mask")
    out = {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in keys}
    out["label"] = np.asarray(labels, dtype=task.label_dtype())
    out["idx"] = np.asarray(idx, dtype=np.int32)
    return out
