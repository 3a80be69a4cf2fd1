"""Transfer sets D_T for Pre-trained Distillation: unlabeled text the teacher labels softly.

The paper distils on unlabeled text (for SST-2: movie reviews) instead of only the task's labeled
train set, because a larger in-domain D_T is what makes distillation work. D_T carries no labels,
so any text source will do; what matters is that it never contains the task's dev or test
sentences (the student would be taught the teacher's answers on the evaluation set). Everything
here is a plain function first (testable without TFDS); ``BertMiniTransfer`` wraps them as a TFDS
builder whose configs name the paper's settings.

Sources: IMDB reviews (split into sentences or fixed word windows), the text of a GLUE split with
labels dropped, or any column of any TSV file. ``build_transfer_set`` applies length filters,
removes exact duplicates inside D_T and drops every text that matches a dev/test sentence of the
task after normalisation, and reports how many examples each step removed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from bert_mini.data.sources import DataError, require_file

__all__ = [
    "GLUE_TEXT_COLUMNS",
    "IMDB_SPLITS",
    "BertMiniTransfer",
    "GlueSource",
    "ImdbSource",
    "TransferConfig",
    "TransferCounts",
    "TransferExample",
    "TsvSource",
    "build_from_specs",
    "build_transfer_set",
    "glue_eval_texts",
    "glue_texts",
    "imdb_texts",
    "normalize_for_overlap",
    "read_imdb_reviews",
    "split_sentences",
    "strip_html",
    "tsv_column",
    "tsv_columns",
    "word_windows",
]

IMDB_SPLITS = ("train", "test", "unsup")
IMDB_HOW_TO_GET = (
    "the IMDB reviews are staged as imdb/{train,test,unsup}.tsv.gz in ../shared/data "
    "(see its SOURCES.md); set BERT_MINI_DATA to the folder that holds imdb/"
)
GLUE_HOW_TO_GET = (
    "GLUE TSVs are staged as glue/<TASK>/<split>.tsv in ../shared/data (see its SOURCES.md); "
    "set BERT_MINI_DATA to the folder that holds glue/"
)

# The text columns of each GLUE task's TSV files (labels and ids are dropped). CoLA's train/dev
# have no header and the sentence in column 3; its test file has a header `index\tsentence`.
GLUE_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "SST-2": ("sentence",),
    "CoLA": ("sentence",),
    "MRPC": ("#1 String", "#2 String"),
    "RTE": ("sentence1", "sentence2"),
    "STS-B": ("sentence1", "sentence2"),
    "QNLI": ("question", "sentence"),
}
_HEADERLESS_GLUE_FILES: dict[tuple[str, str], tuple[int, ...]] = {
    ("CoLA", "train"): (3,),
    ("CoLA", "dev"): (3,),
}
_PAIR_MODES = ("pair", "each")


class TransferExample(NamedTuple):
    """One D_T example: ``text`` (plus ``text_b`` for pair tasks) and where it came from."""

    text: str
    text_b: str | None
    source: str


# ------------------------------------------------------------------------------ cleaning

# `<br />` is how IMDB marks line breaks. The staged train/unsup files were found without any
# (the tags were dropped, gluing sentences as "film.The"), test still has 100k of them; handle both.
_BR_RE = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
# The handful of real formatting tags in IMDB; `<grin>`-style asides are text and stay.
_TAG_RE = re.compile(r"</?(?:i|b|u|em|strong|p|span|div|hr|a)(?:\s[^<>]*)?/?>", re.IGNORECASE)
_SPACES_RE = re.compile(r"[ \t\f\v\u00a0]+")


def strip_html(text: str) -> str:
    """Remove IMDB's HTML markup: each ``<br />`` becomes a line break (a hard sentence break)."""
    text = _BR_RE.sub("\n", text)
    text = _TAG_RE.sub("", text)
    lines = (_SPACES_RE.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# Abbreviations whose final "." does not end a sentence (lower-case, without the final dot).
# "etc." and "Inc." are left out on purpose: in reviews they end sentences more often than not.
# fmt: off
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "messrs", "dr", "prof", "sr", "jr", "st", "mt", "ft", "lt", "col",
    "gen", "sgt", "capt", "cmdr", "adm", "gov", "sen", "rep", "rev", "hon", "pres",
    "vs", "v", "e.g", "i.e", "cf", "viz", "approx", "a.k.a", "fig", "vol", "ch", "pp",
})
# fmt: on
_TERMINATOR_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*")
_NEXT_SENTENCE_RE = re.compile(r"[\"'\u201c\u2018(\[]*[A-Z]")
_GLUED_NEXT_RE = re.compile(r"[A-Z][a-z]")
_INITIALS_RE = re.compile(r"(?:[A-Z]\.)*[A-Z]")


def _is_abbreviation(before: str) -> bool:
    """Whether the word ending right before a single "." is an abbreviation or an initial."""
    parts = before.rsplit(None, 1)
    if not parts:
        return False
    word = parts[-1].lstrip("\"'\u201c\u2018([")
    if word.lower() in _ABBREVIATIONS:
        return True
    return word != "I" and _INITIALS_RE.fullmatch(word) is not None


def _split_paragraph(paragraph: str) -> list[str]:
    """Rule-based sentence split of one line; see ``split_sentences`` for the rules."""
    sentences: list[str] = []
    start = 0
    for m in _TERMINATOR_RE.finditer(paragraph):
        end = m.end()
        rest = paragraph[end:]
        if rest[:1].isspace():
            stripped = rest.lstrip()
            if not _NEXT_SENTENCE_RE.match(stripped):
                continue
            next_start = len(paragraph) - len(stripped)
        elif (
            _GLUED_NEXT_RE.match(rest)
            and m.start() > 0
            and (paragraph[m.start() - 1].islower() or paragraph[m.start() - 1] == ")")
        ):
            next_start = end
        else:
            continue
        if m.group() == "." and _is_abbreviation(paragraph[start : m.start()]):
            continue
        sentences.append(paragraph[start:end])
        start = next_start
    sentences.append(paragraph[start:])
    return [s for s in (" ".join(x.split()) for x in sentences) if s]


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a small, predictable rule set (no model, no downloads).

    Rules: line breaks always end a sentence. Inside a line, a run of ``.``/``!``/``?`` (plus
    closing quotes/brackets) ends a sentence when it is followed by whitespace and then a capital
    letter (optionally after opening quotes/brackets), or, because the staged IMDB files lost
    their ``<br />`` tags without a space, when it directly follows a lower-case letter or ``)``
    and is directly followed by a capital and a lower-case letter ("film.The"). A single ``.``
    after an abbreviation ("Mr.", "Dr.", "e.g.", "vs.") or an initial ("J.", "U.S.") never
    splits. Sentences are whitespace-collapsed; empty ones are dropped.
    """
    sentences: list[str] = []
    for paragraph in text.split("\n"):
        if paragraph.strip():
            sentences.extend(_split_paragraph(paragraph))
    return sentences


def word_windows(text: str, n_words: int) -> list[str]:
    """Consecutive non-overlapping windows of ``n_words`` whitespace words (the last may be short).

    An alternative to sentences when D_T should look like the fixed-length inputs the teacher
    sees; line breaks are treated as spaces.
    """
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    words = text.split()
    return [" ".join(words[i : i + n_words]) for i in range(0, len(words), n_words)]


_NOT_ALNUM_RE = re.compile(r"[\W_]+")


def normalize_for_overlap(text: str) -> str:
    """A key under which an IMDB/raw sentence and its SST/PTB-tokenised twin compare equal.

    SST-2 is lower-cased and PTB-tokenised ("it 's", "does n't", "ca n't", "-lrb-"), raw text is
    not ("It's", "can't", "("). Lower-casing, undoing PTB escapes, stripping accents and then
    dropping every character that is not a letter or digit (spaces included) makes all of these
    spacing and punctuation differences vanish, while any change of words still shows.
    """
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    for escape in ("-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"):
        text = text.replace(escape, " ")
    return _NOT_ALNUM_RE.sub("", text)


# ------------------------------------------------------------------------------- readers


def read_imdb_reviews(imdb_dir: str | os.PathLike, split: str) -> Iterator[str]:
    """Stream the raw review texts of ``imdb/<split>.tsv.gz`` (header row, a ``text`` column)."""
    if split not in IMDB_SPLITS:
        raise ValueError(f"unknown IMDB split {split!r}; expected one of {IMDB_SPLITS}")
    path = require_file(pathlib.Path(imdb_dir) / f"{split}.tsv.gz", IMDB_HOW_TO_GET)
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
            header = f.readline().rstrip("\r\n").split("\t")
            if "text" not in header:
                raise DataError(f"{path}:1: no 'text' column in header {header}")
            col, n_fields = header.index("text"), len(header)
            for lineno, line in enumerate(f, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != n_fields:
                    raise DataError(
                        f"{path}:{lineno}: expected {n_fields} tab-separated fields "
                        f"{header}, found {len(fields)}"
                    )
                yield fields[col]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as gzipped UTF-8 TSV ({e})") from None


def imdb_texts(
    imdb_dir: str | os.PathLike,
    splits: Sequence[str] = IMDB_SPLITS,
    unit: str = "sentences",
    window_words: int = 64,
) -> Iterator[str]:
    """HTML-free IMDB text, one sentence (or one ``window_words`` window) at a time."""
    if unit not in ("sentences", "windows"):
        raise ValueError(f"unit must be 'sentences' or 'windows', got {unit!r}")
    for split in splits:
        for review in read_imdb_reviews(imdb_dir, split):
            text = strip_html(review)
            if unit == "sentences":
                yield from split_sentences(text)
            else:
                yield from word_windows(text, window_words)


def _read_tsv_rows(path: pathlib.Path) -> list[str]:
    """Lines of a TSV file: UTF-8 with or without BOM, split on "\\n" only, no quoting."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the usual final newline, not an extra row
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def tsv_columns(
    path: str | os.PathLike, columns: Sequence[str | int], has_header: bool = True
) -> list[tuple[str, ...]]:
    """The given columns (names or 0-based indices) of every data row, values stripped.

    Fields are split on tabs with no quote handling (GLUE sentences contain bare ``"``) and a
    UTF-8 BOM is ignored (MRPC starts with one). A short row or an unknown column name is a
    ``DataError`` naming the file and line.
    """
    path = require_file(pathlib.Path(path), "check the path")
    lines = _read_tsv_rows(path)
    if has_header:
        if not lines:
            raise DataError(f"{path}: empty file, expected a header row")
        header = lines[0].split("\t")
        body, first_line = lines[1:], 2
    else:
        header, body, first_line = [], lines, 1
    indices: list[int] = []
    for column in columns:
        if isinstance(column, int):
            indices.append(column)
        elif column in header:
            indices.append(header.index(column))
        elif has_header:
            raise DataError(f"{path}:1: no column {column!r} in header {header}")
        else:
            raise DataError(f"{path}: column {column!r} given by name but has_header=False")
    need = max(indices) + 1 if indices else 0
    rows: list[tuple[str, ...]] = []
    for lineno, line in enumerate(body, start=first_line):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < need:
            raise DataError(
                f"{path}:{lineno}: expected at least {need} tab-separated fields, "
                f"found {len(fields)}"
            )
        rows.append(tuple(fields[i].strip() for i in indices))
    return rows


def tsv_column(path: str | os.PathLike, column: str | int, has_header: bool = True) -> list[str]:
    """One column of a TSV file as a list of stripped strings (see ``tsv_columns``)."""
    return [row[0] for row in tsv_columns(path, [column], has_header)]


def _glue_file_columns(task: str, split: str) -> tuple[tuple[str | int, ...], bool]:
    if task not in GLUE_TEXT_COLUMNS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {list(GLUE_TEXT_COLUMNS)}")
    if (task, split) in _HEADERLESS_GLUE_FILES:
        return _HEADERLESS_GLUE_FILES[task, split], False
    return GLUE_TEXT_COLUMNS[task], True


def glue_texts(
    glue_dir: str | os.PathLike, task: str, split: str = "train", pair_mode: str = "pair"
) -> list[TransferExample]:
    """The text of ``glue/<task>/<split>.tsv`` with labels dropped.

    For pair tasks ``pair_mode="pair"`` keeps each row as (text, text_b); ``"each"`` yields every
    sentence as its own single-text example (a D_T for a single-sentence student).
    """
    if pair_mode not in _PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {_PAIR_MODES}, got {pair_mode!r}")
    columns, has_header = _glue_file_columns(task, split)
    path = require_file(pathlib.Path(glue_dir) / task / f"{split}.tsv", GLUE_HOW_TO_GET)
    source = f"glue/{task}/{split}"
    rows = tsv_columns(path, columns, has_header)
    if len(columns) == 1:
        return [TransferExample(r[0], None, source) for r in rows]
    if pair_mode == "pair":
        return [TransferExample(r[0], r[1], source) for r in rows]
    return [TransferExample(t, None, source) for r in rows for t in r]


def glue_eval_texts(glue_dir: str | os.PathLike, task: str) -> list[str]:
    """Every sentence of the task's dev and test files: what D_T must never contain."""
    texts: list[str] = []
    for split in ("dev", "test"):
        texts.extend(e.text for e in glue_texts(glue_dir, task, split, pair_mode="each"))
    return texts


# ------------------------------------------------------------------------ source specs


@dataclasses.dataclass(frozen=True)
class ImdbSource:
    """IMDB reviews as sentences or word windows; paths are relative to the data root."""

    splits: tuple[str, ...] = IMDB_SPLITS
    unit: str = "sentences"
    window_words: int = 64
    min_words: int = 3
    max_words: int | None = 100
    directory: str = "imdb"

    @property
    def name(self) -> str:
        return f"imdb/{'+'.join(self.splits)}/{self.unit}"

    def examples(self, root: pathlib.Path) -> Iterator[TransferExample]:
        name = self.name
        for text in imdb_texts(root / self.directory, self.splits, self.unit, self.window_words):
            yield TransferExample(text, None, name)


@dataclasses.dataclass(frozen=True)
class GlueSource:
    """The label-free text of one GLUE split (``glue/<task>/<split>.tsv`` under the data root)."""

    task: str
    split: str = "train"
    pair_mode: str = "pair"
    min_words: int = 1
    max_words: int | None = None
    directory: str = "glue"

    @property
    def name(self) -> str:
        return f"glue/{self.task}/{self.split}"

    def examples(self, root: pathlib.Path) -> Iterator[TransferExample]:
        yield from glue_texts(root / self.directory, self.task, self.split, self.pair_mode)


@dataclasses.dataclass(frozen=True)
class TsvSource:
    """Any column of any TSV file (absolute, or relative to the data root)."""

    path: str
    column: str | int
    has_header: bool = True
    min_words: int = 1
    max_words: int | None = None

    @property
    def name(self) -> str:
        return f"{self.path}:{self.column}"

    def examples(self, root: pathlib.Path) -> Iterator[TransferExample]:
        for text in tsv_column(root / self.path, self.column, self.has_header):
            yield TransferExample(text, None, self.name)


Source = ImdbSource | GlueSource | TsvSource


@dataclasses.dataclass
class TransferCounts:
    """What happened to the candidate examples of one source (or of all, under "total")."""

    read: int = 0
    dropped_length: int = 0
    dropped_duplicate: int = 0
    dropped_overlap: int = 0
    kept: int = 0

    def add(self, other: TransferCounts) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _length_ok(example: TransferExample, min_words: int, max_words: int | None) -> bool:
    for text in (example.text, example.text_b):
        if text is None:
            continue
        n = len(text.split())
        if n < min_words or (max_words is not None and n > max_words):
            return False
    return True


def _quotas(max_examples: int | None, n_sources: int) -> list[int | None]:
    """Split a total cap evenly over sources (earlier sources take the remainder)."""
    if max_examples is None:
        return [None] * n_sources
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    base, extra = divmod(max_examples, n_sources)
    return [base + (1 if i < extra else 0) for i in range(n_sources)]


def build_transfer_set(
    sources: Sequence[tuple[str, Iterable[TransferExample], int, int | None]],
    exclude_texts: Iterable[str] = (),
    max_examples: int | None = None,
) -> tuple[list[TransferExample], dict[str, TransferCounts]]:
    """Filter, deduplicate and decontaminate candidate examples into one D_T.

    ``sources`` are ``(name, examples, min_words, max_words)``; every text of an example must
    have between ``min_words`` and ``max_words`` whitespace words. An example whose text (or
    text_b) normalises (``normalize_for_overlap``) to one of ``exclude_texts`` (the task's
    dev/test sentences) is dropped as overlap; one identical (after whitespace collapse) to an
    earlier kept example, in any source, is dropped as a duplicate. ``max_examples`` caps the
    total, shared evenly between sources so every source is represented; sources are read
    lazily, so a small cap reads only the start of each. Returns the kept examples and the counts
    per source name plus ``"total"``.
    """
    excluded = {k for k in (normalize_for_overlap(t) for t in exclude_texts) if k}
    seen: set[tuple[str, str | None]] = set()
    kept: list[TransferExample] = []
    report: dict[str, TransferCounts] = {}
    for (name, examples, min_words, max_words), quota in zip(
        sources, _quotas(max_examples, len(sources)), strict=True
    ):
        counts = report.setdefault(name, TransferCounts())
        n_kept_here = 0
        for example in examples:
            if quota is not None and n_kept_here >= quota:
                break
            counts.read += 1
            text = " ".join(example.text.split())
            text_b = None if example.text_b is None else " ".join(example.text_b.split())
            example = example._replace(text=text, text_b=text_b)
            if not _length_ok(example, min_words, max_words):
                counts.dropped_length += 1
                continue
            if any(normalize_for_overlap(t) in excluded for t in (text, text_b) if t is not None):
                counts.dropped_overlap += 1
                continue
            key = (text, text_b)
            if key in seen:
                counts.dropped_duplicate += 1
                continue
            seen.add(key)
            kept.append(example)
            counts.kept += 1
            n_kept_here += 1
    total = TransferCounts()
    for counts in report.values():
        total.add(counts)
    report["total"] = total
    return kept, report


def build_from_specs(
    specs: Sequence[Source],
    root: str | os.PathLike,
    dedup_task: str | None = None,
    max_examples: int | None = None,
) -> tuple[list[TransferExample], dict[str, TransferCounts]]:
    """``build_transfer_set`` over source specs, deduplicated against ``dedup_task``'s dev/test."""
    root = pathlib.Path(root)
    exclude = glue_eval_texts(root / "glue", dedup_task) if dedup_task else []
    sources = [(s.name, s.examples(root), s.min_words, s.max_words) for s in specs]
    return build_transfer_set(sources, exclude, max_examples)


# ---------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class TransferConfig(tfds.core.BuilderConfig):
    """A D_T recipe: which sources, whether examples are pairs, which task's dev/test to avoid."""

    sources: tuple[Any, ...] = ()
    pair: bool = False
    dedup_task: str | None = None
    max_examples: int | None = None


_IMDB_SENTENCES = ImdbSource()
_SST2_TRAIN = GlueSource("SST-2")


class BertMiniTransfer(tfds.core.GeneratorBasedBuilder):
    """Unlabeled transfer sets D_T as TFDS datasets with one ``train`` split.

    Configs: ``imdb_sentences`` (IMDB train+test+unsup, sentences of 3-100 words),
    ``sst2_train_text`` (SST-2 train sentences, labels dropped) and ``movie_sst2`` (both, the
    paper's SST-2 setting); all three exclude SST-2 dev/test sentences. ``mrpc_train_pairs``
    shows the pair form. Pass ``max_examples=N`` for a small build (its own config name, so it
    never collides with the full one). Per-source counts are in ``info.metadata["counts"]``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DEFAULT_SOURCE = "."  # sources name files under the shared data root (imdb/, glue/)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at the shared data folder that holds imdb/ and glue/ "
        "(see ../shared/data/SOURCES.md)."
    )
    BUILDER_CONFIGS = [
        TransferConfig(
            name="imdb_sentences",
            description="IMDB train+test+unsup reviews split into sentences (3-100 words).",
            sources=(_IMDB_SENTENCES,),
            dedup_task="SST-2",
        ),
        TransferConfig(
            name="sst2_train_text",
            description="SST-2 train sentences with labels dropped.",
            sources=(_SST2_TRAIN,),
            dedup_task="SST-2",
        ),
        TransferConfig(
            name="movie_sst2",
            description="IMDB sentences + SST-2 train text, minus SST-2 dev/test sentences.",
            sources=(_IMDB_SENTENCES, _SST2_TRAIN),
            dedup_task="SST-2",
        ),
        TransferConfig(
            name="mrpc_train_pairs",
            description="MRPC train sentence pairs with labels dropped, minus MRPC dev/test.",
            sources=(GlueSource("MRPC"),),
            pair=True,
            dedup_task="MRPC",
        ),
    ]

    def __init__(
        self, *, config: str | TransferConfig | None = None, max_examples: int | None = None, **kw
    ) -> None:
        if max_examples is not None:
            base = config if isinstance(config, TransferConfig) else None
            if base is None:
                name = config or self.BUILDER_CONFIGS[0].name
                matches = [c for c in self.BUILDER_CONFIGS if c.name == name]
                if not matches:
                    names = [c.name for c in self.BUILDER_CONFIGS]
                    raise ValueError(f"unknown config {name!r}; expected one of {names}")
                base = matches[0]
            config = dataclasses.replace(
                base, name=f"{base.name}_max{max_examples}", max_examples=max_examples
            )
        super().__init__(config=config, **kw)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text(), "source": tfds.features.Text()}
        if self.builder_config.pair:
            features["text_b"] = tfds.features.Text()
        return self.dataset_info_from_configs(
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/1908.08962",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        root = pathlib.Path(dl_manager.manual_dir)
        examples, report = build_from_specs(
            config.sources, root, config.dedup_task, config.max_examples
        )
        self.info.metadata["counts"] = {name: c.as_dict() for name, c in report.items()}
        return {"train": self._generate_examples(examples)}

    def _generate_examples(self, examples: list[TransferExample]) -> Iterator[tuple[str, dict]]:
        pair = self.builder_config.pair
        for i, example in enumerate(examples):
            record = {"text": example.text, "source": example.source}
            if pair:
                record["text_b"] = example.text_b or ""
            yield str(i), record
