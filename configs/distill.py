"""Distill a fine-tuned teacher into a compact student on transfer data (Pre-trained Distillation).

    python -m bert_mini.main --config=configs/distill.py:task=sst2,teacher=/tmp/bert_mini/sst2/best,student=/tmp/bert_mini/pretrain_mini/best \
        --workdir=/tmp/bert_mini/distill_sst2

Loss: -sum_y P_teacher(y|x) log P_student(y|x) at temperature 1, no hard labels (the paper).
Arguments: ``task``, ``teacher`` (a fine-tuned checkpoint, run frozen in the step), ``logits``
(cached teacher logits .npy over the transfer set instead of a teacher), ``student`` (init
checkpoint of the pre-trained student; omitted = the paper's random-student baseline "D"),
``variant`` (student size without a student checkpoint), ``transfer`` (task_train_text or
movie_sst2), ``runlocal``.
"""

from bert_mini import config_lib

KNOWN_ARGS = {"task", "teacher", "logits", "student", "variant", "transfer", "runlocal"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/distill.py")
    config = config_lib.base_config()
    config.mode = "distill"
    config.data.task = str(args.get("task", "sst2"))
    config.data.transfer = str(args.get("transfer", "task_train_text"))
    config.model.head = "regression" if config.data.task == "stsb" else "classification"
    config.model.num_labels = 1 if config.data.task == "stsb" else 2
    config.model.init_checkpoint = str(args.get("student", ""))
    config.model.variant = str(args.get("variant", "mini"))
    config.distill.teacher_checkpoint = str(args.get("teacher", ""))
    config.distill.teacher_logits = str(args.get("logits", ""))
    config.train.global_batch_size = 32
    config.train.learning_rate = 1e-4
    config.train.num_train_steps = 20_000
    config.eval.every_steps = 2_000
    config.checkpoint.every_steps = 2_000
    if args.get("runlocal"):
        config.data.max_seq_length = 64
        config.data.max_examples = 512
        config_lib.apply_runlocal(config)
    return config
