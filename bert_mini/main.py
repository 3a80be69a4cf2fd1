"""Runs one experiment: ``python -m bert_mini.main --config=configs/X.py[:args] --workdir=DIR``.

Override any config field with ``--config.train.learning_rate=3e-5``; a key that the config does
not have is an error (configs are locked). Rerunning the same command resumes from the last
checkpoint in ``--workdir``. Multi-host jobs start JAX's distributed runtime through
``bert_mini.distributed`` (the ``launch/`` scripts set it up; ``--jax_distributed`` forces it).
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bert_mini import host_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file, optionally with an argument: file.py:arg", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and results")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed",
    False,
    "start jax.distributed on every host (also: env BERT_MINI_DISTRIBUTED=1, or auto-detected "
    "on Cloud TPU, multi-task SLURM and Open MPI; see bert_mini/distributed.py)",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    host_memory.keep_freed_memory()  # before TF and JAX start their thread pools
    import tensorflow as tf

    from bert_mini import distributed

    tf.config.set_visible_devices([], "GPU")  # TF only feeds data; the accelerators are JAX's
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and TF chatter at INFO
    logging.getLogger("bert_mini").setLevel(logging.INFO)
    distributed.maybe_initialize(requested=_DISTRIBUTED.value)  # before any JAX computation
    distributed.log_topology()
    config = _CONFIG.value
    with config.unlocked():
        config.workdir = _WORKDIR.value
    if config.mode == "pipeline":  # configs/pd_*.py: every stage of Pre-trained Distillation
        from bert_mini import pipeline

        pipeline.run_pipeline(config, _WORKDIR.value)
    else:
        from bert_mini import train

        train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
