"""Pre-trained Distillation on SQuAD v1.1: span distillation (bert_mini.pipeline).

    python -m bert_mini.main --config=configs/pd_squad.py:student=L-4_H-256,method=pd --workdir=/tmp/bert_mini/pd_squad_mini

The teacher (default: BERT-Large, ``teacher_init=google:large``) is fine-tuned on SQuAD; its start
and end logits over D_T = the train questions+contexts as run_squad.py windows (no answers) are
cached once, one ``[2 * max_seq_length]`` row per window; the student minimises the mean of the
start and end soft cross-entropies (T = 1, no hard labels). Dev EM/F1 and ``dev_predictions.json``
({id: answer}) come out of the evaluate stage (SQuAD has no public test set). The default splits
need ``train-v1.1.json`` in ``../shared/data/squad`` (only the dev file is staged here).
Arguments as in ``configs/pd_sst2.py``: ``student``, ``student_init``, ``teacher`` (a SQuAD
fine-tuned checkpoint with a span head), ``teacher_init``, ``method`` (pd | pdf | pf | d |
scratch), ``runlocal`` (BERT-Tiny student, the staged MiniLM as teacher, seq 128, doc_stride 64,
tens of steps; trains on ``validation[:50%]`` and evaluates on ``validation[50%:]`` of the
staged dev file, so its scores are a smoke test: the halves share paragraphs).
"""

from bert_mini import config_lib

SOURCE = "configs/pd_squad.py"
TASK_STAGES = ("stage_teacher", "stage_distill", "stage_finetune")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, config_lib.PD_ARGS, SOURCE)
    if args.get("task", "squad") != "squad":
        raise ValueError(f"{SOURCE}: task={args['task']!r}; this config is for squad only")
    config = config_lib.pd_config(arg, SOURCE, task="squad", transfer="task_train_text")
    config.pipeline.max_seq_length = 384  # evaluation windows
    config.pipeline.predict_batch_size = 64
    config.pipeline.logits_shard_size = 4_096  # 4096 x 768 float32 = 12 MiB per shard
    for section in TASK_STAGES:
        stage = config[section]
        stage.data.task = "squad"
        stage.model.head = "span"
        stage.data.max_seq_length = 384
        stage.data.doc_stride = 128
        stage.data.max_query_length = 64
        stage.eval.global_batch_size = 64
    if args.get("runlocal"):
        _squad_runlocal(config)
        return config
    # ~88.6k train windows: 2 epochs at batch 32 for the teacher and for fine-tuning.
    config.stage_teacher.train.learning_rate = 3e-5
    config.stage_teacher.train.num_train_steps = 5_500
    config.stage_distill.train.num_train_steps = 20_000
    config.stage_finetune.train.num_train_steps = 5_500
    return config


def _squad_runlocal(config) -> None:
    """On top of pd_config's runlocal: SQuAD windows of 128 tokens on the staged dev file."""
    config.pipeline.max_seq_length = 128
    config.pipeline.logits_shard_size = 512
    for section in TASK_STAGES:
        data = config[section].data
        data.train_split = "validation[:50%]"
        data.eval_split = "validation[50%:]"
        data.max_seq_length = 128
        data.doc_stride = 64
        data.trim_multiple = 64  # two widths: two compilations of the step
