"""Strict import and atomic export of BERT checkpoints: the public ``from_pretrained`` API.

Import reads any supported checkpoint (``checkpoint_formats``), then walks the name table
(``checkpoint_names``) for the model asked for: a missing, mis-shaped or left-over tensor is an
error that names it and the file. A head the source lacks is created fresh only with
``new_head=True``; a head the caller did not ask for is dropped only with ``drop_heads=True``;
both are reported. Export writes into a scratch directory and renames it into place, so a crash
or an error never replaces a good checkpoint.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import nnx

from bert_mini import checkpoint_formats, downloads
from bert_mini.checkpoint_formats import (
    FORMATS,
    CheckpointError,
    SourceCheckpoint,
    read_checkpoint,
)
from bert_mini.checkpoint_names import HEAD_GROUPS, convert_layout, source_name, tensor_rules
from bert_mini.model import HEAD_CHOICES, BertModel, create_model
from bert_mini.tokenization import BertTokenizer

_log = logging.getLogger("bert_mini")

__all__ = [
    "FORMATS",
    "CheckpointError",
    "LoadReport",
    "build_model",
    "from_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "save_pretrained",
]

# ----------------------------------------------------------------------------- building models


@dataclasses.dataclass
class LoadReport:
    """What an import did beyond copying tensors: fresh heads, dropped heads, skipped non-params."""

    source: str
    head: str | None
    new_groups: list[str] = dataclasses.field(default_factory=list)
    dropped_groups: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def log(self) -> None:
        """A fresh head is a warning (its outputs are random until trained); the rest is info."""
        if self.new_groups:
            _log.warning(
                "%s: created fresh (random init): %s", self.source, ", ".join(self.new_groups)
            )
        if self.dropped_groups:
            _log.info("%s: dropped unused heads: %s", self.source, ", ".join(self.dropped_groups))
        if self.skipped:
            _log.info("%s: skipped non-parameters: %s", self.source, ", ".join(self.skipped))


def _auto_head(source: SourceCheckpoint) -> str | None:
    """The head a converter should keep: everything the source has."""
    present = set(source.groups_present())
    if source.head_hint is not None:
        return source.head_hint
    if {"mlm", "nsp"} <= present:
        return "pretraining"
    for group, head in (("mlm", "mlm"), ("classifier", "classification"), ("span", "span")):
        if group in present:
            return head
    return None


def _shorten(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _num_labels(source: SourceCheckpoint, head: str | None, requested: int | None) -> int:
    rule = next(r for r in tensor_rules(0, ("classifier",)) if r.ours == "classifier/bias")
    name = source_name(rule, source.fmt)
    if head not in ("classification", "regression") or name not in source.tensors:
        if head == "regression":
            return 1
        return 2 if requested is None else requested
    found = int(source.tensors[name].shape[0])
    expected = 1 if head == "regression" else requested
    if expected is not None and expected != found:
        raise CheckpointError(
            f"{source.weights_path}: tensor {name!r} has {found} labels, "
            f"but {expected} were asked for"
        )
    return found


def classifier_labels(source: SourceCheckpoint) -> int | None:
    """How many labels the source's classification/regression head predicts (None: no head)."""
    rule = next(r for r in tensor_rules(0, ("classifier",)) if r.ours == "classifier/bias")
    name = source_name(rule, source.fmt)
    return int(source.tensors[name].shape[0]) if name in source.tensors else None


def build_model(
    source: SourceCheckpoint,
    head: str | None = None,
    num_labels: int | None = None,
    *,
    new_head: bool = False,
    drop_heads: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
) -> tuple[BertModel, LoadReport]:
    """A ``BertModel`` holding the source's tensors, checked strictly (see module docstring).

    ``head="auto"`` keeps every head the source has.
    """
    if head == "auto":
        head = _auto_head(source)
    if head not in HEAD_CHOICES:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEAD_CHOICES)} or 'auto'")
    config = dataclasses.replace(source.config, dtype=dtype, param_dtype=param_dtype)
    model = create_model(config, head, _num_labels(source, head, num_labels), seed)
    report = LoadReport(str(source.weights_path), head, skipped=list(source.skipped))

    state = nnx.state(model, nnx.Param)
    variables = {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    rules = tensor_rules(config.num_hidden_layers, model.heads)
    assert {r.ours for r in rules} == set(variables), "tensor_rules out of sync with BertModel"

    where = source.weights_path
    missing: dict[str, list[str]] = {}
    used: set[str] = set()
    for rule in rules:
        name = source_name(rule, source.fmt)
        if name not in source.tensors:
            missing.setdefault(rule.group, []).append(name)
            continue
        array = convert_layout(source.tensors[name], rule, source.fmt)
        variable = variables[rule.ours]
        expected_shape = tuple(variable.get_value().shape)
        if tuple(array.shape) != expected_shape:
            stored = tuple(source.tensors[name].shape)
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {stored}, but {source.config_path.name} "
                f"implies {convert_layout(np.empty(expected_shape), rule, source.fmt).shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{where}: tensor {name!r} has non-float dtype {array.dtype}")
        variable.set_value(np.asarray(array, dtype=config.param_dtype))
        used.add(name)

    for group, names in missing.items():
        whole_group_missing = len(names) == sum(r.group == group for r in rules)
        if group != "encoder" and whole_group_missing and new_head:
            report.new_groups.append(group)
            continue
        hint = (
            "; pass new_head=True to create it fresh"
            if group != "encoder" and whole_group_missing
            else ""
        )
        raise CheckpointError(f"{where}: missing {group} tensor(s) {_shorten(names)}{hint}")

    unused = sorted(set(source.tensors) - used)
    if unused:
        head_rules = tensor_rules(0, HEAD_GROUPS)
        group_of = {source_name(r, source.fmt): r.group for r in head_rules}
        known = all(name in group_of for name in unused)
        if not (known and drop_heads):
            hint = "; pass drop_heads=True to drop the unused heads" if known else ""
            raise CheckpointError(f"{where}: unused tensor(s) {_shorten(unused)}{hint}")
        report.dropped_groups = sorted({group_of[name] for name in unused})
    nnx.update(model, state)
    return model, report


# ----------------------------------------------------------------------------- public loading


def _tokenizer_dir(path: pathlib.Path) -> pathlib.Path:
    return path if path.is_dir() else path.parent


def load_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    num_labels: int | None = None,
    *,
    new_head: bool = False,
    drop_heads: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
) -> tuple[BertModel, BertTokenizer, LoadReport]:
    """``from_pretrained`` plus the load report."""
    path = downloads.resolve_if_release(path)  # a Google release name is downloaded once
    source = read_checkpoint(path)
    tokenizer = BertTokenizer.from_pretrained(_tokenizer_dir(path))
    model, report = build_model(
        source,
        head,
        num_labels,
        new_head=new_head,
        drop_heads=drop_heads,
        dtype=dtype,
        param_dtype=param_dtype,
        seed=seed,
    )
    if tokenizer.vocab_size > source.config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.vocab_path}: {tokenizer.vocab_size} tokens, but {source.config_path} "
            f"has vocab_size {source.config.vocab_size} (word embeddings too small)"
        )
    report.log()
    return model, tokenizer, report


def from_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    num_labels: int | None = None,
    **options: Any,
) -> tuple[BertModel, BertTokenizer]:
    """Loads a Google TF, HF or bert_mini checkpoint directory as ``(model, tokenizer)``.

    ``head``: None (encoder + pooler), "mlm", "pretraining", "classification", "regression",
    "span", or "auto" (whatever the source has). ``options`` are those of ``load_pretrained``
    (``new_head``, ``drop_heads``, ``dtype``, ``param_dtype``, ``seed``). Strict: see
    ``build_model``.
    """
    model, tokenizer, _ = load_pretrained(path, head, num_labels, **options)
    return model, tokenizer


@contextlib.contextmanager
def _atomic_directory(dst: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a scratch directory that replaces ``dst`` only once everything is written."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"destination exists: {dst} (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if dst.exists():
        retired = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(retired)
        scratch.rename(dst)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        scratch.rename(dst)


def save_pretrained(
    model: BertModel,
    tokenizer: BertTokenizer | None,
    dst: str | os.PathLike,
    fmt: str = "bert_mini",
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``model`` (and the tokenizer's vocab) to ``dst`` in ``fmt``, atomically.

    ``dst`` is replaced only after the new checkpoint is complete, so a crash or an error leaves
    an existing checkpoint intact.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    dst = pathlib.Path(dst)
    writer = checkpoint_formats.WRITERS[fmt]
    with _atomic_directory(dst, overwrite) as scratch:
        writer(model, scratch)
        if tokenizer is not None:
            tokenizer.save(scratch)
    return dst
