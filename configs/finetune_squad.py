"""Fine-tune a BERT on SQuAD v1.1 (span head, official EM/F1): the plain fine-tuning baseline.

    python -m bert_mini.main --config=configs/finetune_squad.py:init=../shared/data/checkpoints/all-minilm-l6-v2 --workdir=/tmp/bert_mini/squad

Windows as Google's run_squad.py (max_seq_length 384, doc_stride 128, max_query_length 64),
answers decoded with n-best 20 and max_answer_length 30; EM/F1 are logged as fractions.
The default train split needs ``train-v1.1.json`` in ``../shared/data/squad`` (only the dev file
is staged here; a missing file is a one-line error saying where to get it). Arguments
(comma-separated): ``init`` (an init checkpoint directory: Google TF, HF or bert_mini),
``variant`` (size-table name when there is no init checkpoint), ``runlocal`` (BERT-Tiny unless
``variant``/``init`` is given, seq 128, doc_stride 64, trains on ``validation[:50%]`` of the
staged dev file and evaluates on ``validation[50%:]``, tens of steps). The two halves share
paragraphs (TFDS slices questions, not articles), so runlocal scores are a smoke test only.
"""

from bert_mini import config_lib

KNOWN_ARGS = {"init", "variant", "runlocal"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/finetune_squad.py")
    config = config_lib.base_config()
    config.mode = "finetune"
    config.data.task = "squad"
    config.model.head = "span"
    config.model.init_checkpoint = str(args.get("init", ""))
    config.model.variant = str(args.get("variant", "mini"))
    config.data.max_seq_length = 384
    config.data.doc_stride = 128
    config.data.max_query_length = 64
    # run_squad.py: 2 epochs (~88.6k train windows: ~5.5k steps at batch 32), lr 3e-5 for
    # BERT-Base; compact models prefer larger rates (the paper's grid tops at 3e-4).
    config.train.global_batch_size = 32
    config.train.learning_rate = 1e-4
    config.train.num_train_steps = 5_500
    config.eval.every_steps = 1_000
    config.checkpoint.every_steps = 1_000
    if args.get("runlocal"):
        apply_squad_runlocal(config)
        if "variant" not in args and "init" not in args:
            config.model.variant = "tiny"
        config.train.learning_rate = 5e-4
    return config


def apply_squad_runlocal(config) -> None:
    """Seconds per stage on a CPU, on the staged dev file split in two halves."""
    config_lib.apply_runlocal(config)
    config.data.train_split = "validation[:50%]"
    config.data.eval_split = "validation[50%:]"
    config.data.max_seq_length = 128
    config.data.doc_stride = 64
    config.data.trim_multiple = 64  # two widths: two compilations of the step
    config.train.num_train_steps = 40
    config.eval.every_steps = 20
    config.checkpoint.every_steps = 20
