"""Pre-train a compact BERT with masked LM on a text corpus (step 1 of Pre-trained Distillation).

    python -m bert_mini.main --config=configs/pretrain_mlm.py:variant=L-4_H-256 \
        --workdir=/tmp/bert_mini/pretrain_mini

Arguments: ``variant`` (size-table name, default mini), ``corpus`` (comma-separated globs under
the data dir, default the Gutenberg train shards), ``nsp`` (add next-sentence pairs and loss),
``runlocal`` (the small Gutenberg valid shard, Tiny-sized steps: minutes on a laptop CPU).
"""

from bert_mini import config_lib

KNOWN_ARGS = {"variant", "corpus", "nsp", "runlocal"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/pretrain_mlm.py")
    config = config_lib.pretrain_config(head="pretraining" if args.get("nsp") else "mlm")
    config.model.variant = str(args.get("variant", "mini"))
    config.data.next_sentence = bool(args.get("nsp", False))
    if "corpus" in args:
        config.data.train_files = str(args["corpus"])
    if args.get("runlocal"):
        config.data.train_files = "pretrain/gutenberg/valid.txt.gz"
        config.data.eval_files = "pretrain/wikitext-2-raw/wiki.valid.raw"
        config.data.max_examples = 2_048
        config.data.max_eval_examples = 256
        config_lib.apply_runlocal(config)
        config.train.learning_rate = 5e-4
        config.train.warmup_proportion = 0.1
    return config
