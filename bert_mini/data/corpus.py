"""Unlabelled text corpora as documents: a plain-Python reader and a TFDS builder over it.

Two on-disk layouts are read (plain or gzipped UTF-8, any number of shards per split):

- ``blank_lines`` (Google's ``create_pretraining_data.py`` input, our Gutenberg shards): one
  sentence or paragraph per line; an empty line ends a document.
- ``wikitext`` (WikiText ``wiki.*.raw`` / ``*.tokens``): every line starts with a space, blank lines
  separate *paragraphs*, and a top-level heading `` = Title = `` starts a new article. Headings are
  not text (BERT's Wikipedia data drops them too): the title is kept as the document's title,
  section headings (`` = = Section = = ``) are dropped, and WikiText's split markers
  (`` @-@ ``, `` @,@ ``, `` @.@ ``) are joined back so WordPiece sees ``well-known``, ``1,000``.

``auto`` picks ``wikitext`` for a file whose first non-blank line is a top-level heading.
A document is a list of non-empty lines; masking and example creation happen later
(``bert_mini.data.pretraining``), so one build serves every sequence length and model.
"""

import dataclasses
import glob
import gzip
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from bert_mini.data.sources import DataError, require_file

LAYOUTS = ("auto", "blank_lines", "wikitext")

_TITLE_RE = re.compile(r"^ ?= (?!=)(.*?) = ?$")  # " = Title = ", not " = = Section = = "
_SECTION_RE = re.compile(r"^ ?(=(?: =)+) .*? \1 ?$")
_WIKITEXT_JOIN_RE = re.compile(r" @([-,.])@ ")

GUTENBERG_HOW_TO_GET = (
    "the Project Gutenberg shards are staged in ../shared/data/pretrain/gutenberg "
    "(see ../shared/data/SOURCES.md); set BERT_MINI_DATA to the folder that holds pretrain/"
)
WIKITEXT_HOW_TO_GET = (
    "WikiText-2 raw valid/test are staged in ../shared/data/pretrain/wikitext-2-raw "
    "(see ../shared/data/SOURCES.md); set BERT_MINI_DATA to the folder that holds pretrain/"
)
CUSTOM_HOW_TO_GET = "check the path or glob pattern given for this corpus"


@dataclasses.dataclass(frozen=True)
class Document:
    """One document and where it came from (``doc_id`` is ``<file>:<index in file>``)."""

    doc_id: str
    title: str
    lines: list[str]


# ----------------------------------------------------------------------------- reading


def _numbered_lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """Lines (without the newline) and their 1-based numbers; bad UTF-8 names file and line.

    Read as bytes and decoded per line so an error points at the exact line (a text-mode reader
    decodes ahead in chunks).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):  # noqa: B007 (used in except)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason})") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                yield number, line.rstrip("\r\n")
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
        raise DataError(f"{path}:{number + 1}: cannot read ({e})") from None


def detect_layout(path: pathlib.Path) -> str:
    """``wikitext`` if the first non-blank line is a top-level heading, else ``blank_lines``."""
    for _, line in _numbered_lines(path):
        if line.strip():
            return "wikitext" if _TITLE_RE.match(line) else "blank_lines"
    return "blank_lines"


def _blank_line_documents(path: pathlib.Path) -> Iterator[tuple[str, list[str]]]:
    lines: list[str] = []
    for _, line in _numbered_lines(path):
        text = line.strip()
        if text:
            lines.append(text)
        elif lines:
            yield "", lines
            lines = []
    if lines:
        yield "", lines


def _wikitext_documents(path: pathlib.Path) -> Iterator[tuple[str, list[str]]]:
    title, lines = "", []
    for _, line in _numbered_lines(path):
        heading = _TITLE_RE.match(line)
        if heading:
            if lines:
                yield title, lines
            title, lines = _join_wikitext(heading.group(1).strip()), []
        elif line.strip() and not _SECTION_RE.match(line):
            lines.append(_join_wikitext(line.strip()))
    if lines:
        yield title, lines


def _join_wikitext(text: str) -> str:
    """Undo WikiText's `` @-@ `` style splits (``1 @,@ 000`` -> ``1,000``)."""
    return _WIKITEXT_JOIN_RE.sub(r"\1", text)


def iter_documents(
    paths: Iterable[str | os.PathLike], layout: str = "auto", root: pathlib.Path | None = None
) -> Iterator[Document]:
    """Every non-empty document of every file, in order, with ids relative to ``root``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown corpus layout {layout!r}; choose one of {LAYOUTS}")
    for raw_path in paths:
        path = require_file(pathlib.Path(raw_path), CUSTOM_HOW_TO_GET)
        file_layout = detect_layout(path) if layout == "auto" else layout
        reader = _wikitext_documents if file_layout == "wikitext" else _blank_line_documents
        name = _display_name(path, root)
        for index, (title, lines) in enumerate(reader(path)):
            yield Document(doc_id=f"{name}:{index}", title=title, lines=lines)


def read_documents(paths: Iterable[str | os.PathLike], layout: str = "auto") -> Iterator[list[str]]:
    """The lines (paragraphs or sentences) of each document of ``paths``, in file order."""
    for document in iter_documents(paths, layout):
        yield document.lines


def _display_name(path: pathlib.Path, root: pathlib.Path | None) -> str:
    if root is not None:
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return path.name if root is None else str(path)


# ---------------------------------------------------------------------------- file sets


def resolve_files(
    patterns: Sequence[str], root: str | os.PathLike | None = None, how_to_get: str = ""
) -> list[pathlib.Path]:
    """Expand names and globs (relative ones under ``root``), in order; a miss is a DataError.

    A plain name must exist; a glob must match at least one file. Matches of one glob are sorted
    so shard order (and therefore document ids) does not depend on the file system.
    """
    how_to_get = how_to_get or CUSTOM_HOW_TO_GET
    base = pathlib.Path(root) if root is not None else pathlib.Path.cwd()
    files: list[pathlib.Path] = []
    for pattern in patterns:
        full = pathlib.Path(pattern).expanduser()
        full = full if full.is_absolute() else base / full
        if glob.has_magic(str(full)):
            matches = sorted(pathlib.Path(p) for p in glob.glob(str(full)) if os.path.isfile(p))
            if not matches:
                raise DataError(
                    f"expected data files not found: no file matches {full} ({how_to_get})"
                )
            files.extend(matches)
        else:
            files.append(require_file(full, how_to_get))
    return files


# ---------------------------------------------------------------------------------- TFDS


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """A corpus: split name -> file names or glob patterns (relative ones under ``manual_dir``)."""

    splits: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    layout: str = "auto"
    how_to_get: str = CUSTOM_HOW_TO_GET


def custom_corpus_config(
    name: str, splits: Mapping[str, str | Sequence[str]], layout: str = "auto"
) -> TextCorpusConfig:
    """A config for your own text files: ``{"train": ["/data/books/*.txt.gz"], ...}``.

    Pass it as ``prepare(BertMiniTextCorpus, config=..., tfds_dir=...)``; the name becomes the
    dataset's folder, so give each distinct corpus its own name.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown corpus layout {layout!r}; choose one of {LAYOUTS}")
    if not splits:
        raise ValueError(f"corpus {name!r} names no splits")
    normalised = {
        split: (patterns,) if isinstance(patterns, str) else tuple(patterns)
        for split, patterns in splits.items()
    }
    return TextCorpusConfig(
        name=name,
        version=BertMiniTextCorpus.VERSION,
        description=f"documents from {dict(normalised)}",
        splits=normalised,
        layout=layout,
    )


_GUTENBERG_TRAIN = tuple(f"gutenberg/train-{i:05d}-of-00005.txt.gz" for i in range(5))


class BertMiniTextCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents of a text corpus: ``{"id", "title", "text": [line, ...]}`` per example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents as lists of lines; WikiText headings start documents."}
    DEFAULT_SOURCE = "pretrain"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Files are read from manual_dir (default ../shared/data/pretrain): "
        "gutenberg/*.txt.gz and wikitext-2-raw/wiki.*.raw; see ../shared/data/SOURCES.md."
    )
    BUILDER_CONFIGS = [
        TextCorpusConfig(
            name="gutenberg",
            description="Project Gutenberg books, one paragraph per line (a BookCorpus stand-in).",
            splits={"train": _GUTENBERG_TRAIN, "validation": ("gutenberg/valid.txt.gz",)},
            layout="blank_lines",
            how_to_get=GUTENBERG_HOW_TO_GET,
        ),
        TextCorpusConfig(
            name="wikitext2_raw",
            description="WikiText-2 raw valid/test articles (train is not available offline).",
            splits={
                "validation": ("wikitext-2-raw/wiki.valid.raw",),
                "test": ("wikitext-2-raw/wiki.test.raw",),
            },
            layout="wikitext",
            how_to_get=WIKITEXT_HOW_TO_GET,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "text": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config: TextCorpusConfig = self.builder_config
        try:
            root = pathlib.Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS asserts on a missing or empty folder
            folder = getattr(dl_manager, "_manual_dir", None) or "manual_dir"
            first = next(iter(config.splits.values()))[0]
            raise DataError(
                f"expected data file not found: {pathlib.Path(folder) / first} (the source "
                f"folder {folder} is missing or empty; {config.how_to_get})"
            ) from None
        # Resolve every split first so a missing shard fails before any writing starts.
        files = {
            split: resolve_files(patterns, root, config.how_to_get)
            for split, patterns in config.splits.items()
        }
        return {split: self._generate_examples(paths, root) for split, paths in files.items()}

    def _generate_examples(
        self, paths: list[pathlib.Path], root: pathlib.Path
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for document in iter_documents(paths, self.builder_config.layout, root=root):
            yield (
                document.doc_id,
                {"id": document.doc_id, "title": document.title, "text": document.lines},
            )


def documents_from_dataset(dataset: Any) -> Iterator[list[str]]:
    """The line lists of a built ``BertMiniTextCorpus`` split (``builder.as_dataset(split)``)."""
    for example in tfds.as_numpy(dataset):
        yield [line.decode("utf-8") for line in example["text"]]
