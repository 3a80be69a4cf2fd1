"""Where the shared data lives: ``$BERT_MINI_DATA`` or ``../shared/data`` beside the repository."""

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir() -> pathlib.Path:
    """The folder with GLUE, IMDB, corpora, vocab and checkpoints (see its SOURCES.md)."""
    override = os.environ.get("BERT_MINI_DATA")
    if override:
        return pathlib.Path(override).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()
