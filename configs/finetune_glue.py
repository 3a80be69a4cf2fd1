"""Fine-tune a BERT on a GLUE task (the paper's plain fine-tuning baseline).

    python -m bert_mini.main --config=configs/finetune_glue.py:task=sst2,init=../shared/data/checkpoints/all-minilm-l6-v2 \
        --workdir=/tmp/bert_mini/sst2

Arguments (comma-separated): ``task`` (sst2, cola, mrpc, stsb, rte, qnli, ...), ``init`` (an init
checkpoint directory: Google TF, HF or bert_mini), ``variant`` (size-table name when there is no
init checkpoint), ``runlocal`` (a few hundred examples and steps: minutes on a laptop CPU).
"""

from bert_mini import config_lib

REGRESSION_TASKS = ("stsb",)
KNOWN_ARGS = {"task", "init", "variant", "runlocal"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/finetune_glue.py")
    config = config_lib.base_config()
    config.mode = "finetune"
    task = str(args.get("task", "sst2"))
    config.data.task = task
    config.model.head = "regression" if task in REGRESSION_TASKS else "classification"
    config.model.num_labels = (
        1 if task in REGRESSION_TASKS else (3 if task.startswith("mnli") else 2)
    )
    config.model.init_checkpoint = str(args.get("init", ""))
    config.model.variant = str(args.get("variant", "mini"))
    # The paper: 4 epochs, best of batch {8..128} x lr {3e-4, 1e-4, 5e-5, 3e-5}.
    config.train.global_batch_size = 32
    config.train.learning_rate = 5e-5
    config.train.num_train_steps = 8_400  # ~4 epochs of SST-2 at batch 32
    config.eval.every_steps = 1_000
    config.checkpoint.every_steps = 1_000
    if args.get("runlocal"):
        config.data.max_seq_length = 64
        config.data.max_examples = 1_024  # the first rows of the train split: 60 steps of 16
        config_lib.apply_runlocal(config)
        config.train.num_train_steps = 60
        config.eval.every_steps = 30
        config.checkpoint.every_steps = 30
    return config
