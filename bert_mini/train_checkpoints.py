"""Training checkpoints: Orbax, asynchronous, keep N, with the data position for exact resume.

A checkpoint holds the whole ``TrainState`` (step, params, optimizer state, dropout RNG) and a
JSON item with the input stream's position, so a restarted run continues with exactly the
batches and random numbers the uninterrupted run would have used. Orbax writes each step into a
temporary directory and renames it only when complete, so a process killed mid-write (even by
SIGKILL) leaves the previous checkpoint as the latest one; the leftover temporary directory is
removed on the next start.

The workdir also records which model it trains (``model.json``); resuming with a config of
another model size is an error before anything is written.
"""

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

MODEL_RECORD = "model.json"


class ModelMismatchError(ValueError):
    """The workdir holds checkpoints of a different model than the config asks for."""


def check_model_record(workdir: pathlib.Path, record: dict[str, Any]) -> None:
    """Writes ``model.json`` on the first start; on a restart, insists it matches ``record``."""
    path = workdir / MODEL_RECORD
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # hosts may race: write, rename
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return
    saved = json.loads(path.read_text())
    if saved != record:
        changed = sorted(
            f"{key}: {saved.get(key)!r} -> {record.get(key)!r}"
            for key in set(saved) | set(record)
            if saved.get(key) != record.get(key)
        )
        raise ModelMismatchError(
            f"{path}: this workdir trains another model ({'; '.join(changed)}); "
            "use a new --workdir or the original config"
        )


class TrainCheckpoints:
    """``save(step, state, position)`` / ``restore(template)`` over an Orbax CheckpointManager."""

    def __init__(self, directory: pathlib.Path, *, keep: int, async_save: bool):
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_position),
            ),
        )

    def restore(self, template: Any) -> tuple[Any, dict[str, Any]]:
        """The latest state, laid out like ``template`` (shapes, dtypes and shardings)."""
        step = self.manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
