"""Shared configuration helpers: the table of BERT sizes from Turc et al. (2019).

The paper's 24 compact models are ``L-{2,4,6,8,10,12}_H-{128,256,512,768}`` with ``A = H / 64``
heads and a ``4H`` feed-forward layer; BERT-Base (``L-12_H-768``) is one of them, and BERT-Large
(``L-24_H-1024``, 16 heads) is the paper's biggest teacher. A variant is named as in Google's
release (``uncased_L-4_H-256_A-4``), as ``L-4_H-256``, or by its nickname (``mini``).
"""

import re
from typing import TypedDict

import ml_collections

from bert_mini.paths import shared_data_dir

LAYER_CHOICES = (2, 4, 6, 8, 10, 12)
HIDDEN_CHOICES = (128, 256, 512, 768)

NAMED_VARIANTS = {
    "tiny": "L-2_H-128",
    "mini": "L-4_H-256",
    "small": "L-4_H-512",
    "medium": "L-8_H-512",
    "base": "L-12_H-768",
    "large": "L-24_H-1024",
}


class VariantDims(TypedDict):
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int


def _dims(layers: int, hidden: int, heads: int) -> VariantDims:
    return VariantDims(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )


SIZES: dict[str, VariantDims] = {
    f"L-{layers}_H-{hidden}": _dims(layers, hidden, hidden // 64)
    for layers in LAYER_CHOICES
    for hidden in HIDDEN_CHOICES
}
SIZES["L-24_H-1024"] = _dims(24, 1024, 16)

_VARIANT_RE = re.compile(r"^(?:.*/)?(?:bert[_-])?(?:(?:un)?cased_)?L-(\d+)_H-(\d+)(?:_A-(\d+))?$")


def canonical_variant(name: str) -> str:
    """Maps ``mini``, ``bert-mini``, ``uncased_L-4_H-256_A-4`` or ``L-4_H-256`` to ``L-4_H-256``."""
    key = name.strip().lower()
    key = key.removeprefix("bert-").removeprefix("bert_")
    if key in NAMED_VARIANTS:
        return NAMED_VARIANTS[key]
    match = _VARIANT_RE.match(name.strip())
    if match is None:
        raise ValueError(f"unknown model variant {name!r}; {_choices()}")
    layers, hidden, heads = match.groups()
    variant = f"L-{int(layers)}_H-{int(hidden)}"
    if variant not in SIZES:
        raise ValueError(f"unknown model variant {name!r}; {_choices()}")
    if heads is not None and int(heads) != SIZES[variant]["num_attention_heads"]:
        expected = SIZES[variant]["num_attention_heads"]
        raise ValueError(f"model variant {name!r} names A-{heads}, but {variant} has A-{expected}")
    return variant


def variant_dims(name: str) -> VariantDims:
    """The layer count, width, heads and FFN width of a named variant."""
    return SIZES[canonical_variant(name)]


def _choices() -> str:
    return f"choose one of {sorted(NAMED_VARIANTS)} or L-<layers>_H-<hidden> from {list(SIZES)}"


# ----------------------------------------------------------------------------- run configs


def base_config() -> ml_collections.ConfigDict:
    """Every field a run config may set, with BERT's defaults; configs/*.py override them.

    Configs are locked (``lock_config=True`` in ``main.py``), so ``--config.trian.x=1`` is an
    error instead of a silently ignored typo.
    """
    config = ml_collections.ConfigDict()
    config.mode = "finetune"  # pretrain | finetune | distill
    config.workdir = ""  # set by main.py from --workdir
    config.seed = 0
    # JAX's persistent compilation cache (bert_mini/compile_cache.py), so a restarted run skips
    # compiling: "" = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compile_cache; "off" = none.
    config.compile_cache_dir = ""

    config.model = ml_collections.ConfigDict()
    config.model.variant = "mini"  # a size-table name; ignored when init_checkpoint has a config
    config.model.init_checkpoint = ""  # Google TF / HF / bert_mini directory; "" = random init
    config.model.head = (
        "classification"  # None | mlm | pretraining | classification | regression | span
    )
    config.model.num_labels = 2
    config.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    config.model.param_dtype = "float32"
    config.model.vocab_path = (
        ""  # default: the checkpoint's vocab.txt, else the shared uncased vocab
    )

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = ""  # default: $BERT_MINI_DATA or ../shared/data
    config.data.tfds_dir = ""  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.cache_dir = ""  # pre-training examples cache; default: <workdir>/cache
    config.data.task = "sst2"  # GLUE task or "squad" (finetune, distill)
    config.data.max_seq_length = 128
    config.data.train_files = "pretrain/gutenberg/train-*.txt.gz"  # pretrain; comma-separated globs
    config.data.eval_files = "pretrain/gutenberg/valid.txt.gz"
    config.data.next_sentence = False
    config.data.max_predictions_per_seq = 20
    config.data.whole_word_masking = False
    config.data.transfer = "task_train_text"  # distill: task_train_text | movie_sst2
    config.data.max_examples = 0  # 0 = all; >0 caps the training examples (runlocal)
    config.data.trim_multiple = (
        16  # finetune/distill: cut batch padding to a multiple of this (0 = off)
    )
    config.data.max_eval_examples = 0  # 0 = all; >0 caps pre-training / SQuAD eval examples
    # SQuAD (task "squad"): TFDS split strings, and run_squad.py's window settings.
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.doc_stride = 128
    config.data.max_query_length = 64

    config.train = ml_collections.ConfigDict()
    config.train.global_batch_size = 32
    config.train.num_train_steps = 1000
    config.train.learning_rate = 1e-4
    config.train.warmup_proportion = 0.1
    config.train.optimizer = "adamw"  # adamw | lamb
    config.train.weight_decay = 0.01
    config.train.clip_norm = 1.0
    config.train.grad_accum_steps = 1
    config.train.frozen = ()  # regexes over parameter paths, e.g. ("embeddings/.*",)
    config.train.log_every_steps = 50

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 500
    config.eval.global_batch_size = 64
    config.eval.best_metric = ""  # e.g. "accuracy"; "" = the task's main metric

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 2
    config.checkpoint.async_save = True

    config.distill = ml_collections.ConfigDict()
    config.distill.teacher_checkpoint = ""
    config.distill.teacher_dtype = "float32"
    config.distill.teacher_logits = ""  # a cached .npy of [N, C] logits over the transfer set
    config.distill.temperature = 1.0
    config.distill.hard_label_weight = 0.0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    config.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
    )
    return config


def parse_arg(arg: str | None, known: set[str], source: str) -> dict[str, str | bool]:
    """``"variant=L-4_H-256,runlocal"`` -> ``{"variant": "L-4_H-256", "runlocal": True}``.

    A key outside ``known`` is an error naming ``source`` (the config file), like an unknown
    ``--config.`` key.
    """
    out: dict[str, str | bool] = {}
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        out[key.strip()] = value.strip() if sep else True
    unknown = set(out) - known
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {sorted(unknown)}")
    return out


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a run to minutes on a laptop CPU: small batches, few steps, frequent evals."""
    config.train.global_batch_size = 16
    config.train.num_train_steps = 40
    config.train.log_every_steps = 10
    config.eval.every_steps = 20
    config.eval.global_batch_size = 64
    config.checkpoint.every_steps = 20


# ----------------------------------------------------------------------------- PD pipeline

PD_METHODS = ("pd", "pdf", "pf", "d", "scratch")
PD_ARGS = {"task", "student", "student_init", "teacher", "teacher_init", "method", "runlocal"}
# The paper's teacher is BERT-Large fine-tuned on the task; ``pipeline.teacher_init`` names its
# pre-trained checkpoint (a Google release name is downloaded once, see bert_mini.downloads).
DEFAULT_TEACHER_INIT = "google:large"


def stage_config(
    mode: str, head: str, learning_rate: float, num_train_steps: int, every_steps: int
) -> ml_collections.ConfigDict:
    """A run config of ``mode`` evaluated and checkpointed every ``every_steps`` steps."""
    config = base_config()
    config.mode = mode
    config.model.head = head
    config.train.learning_rate = learning_rate
    config.train.num_train_steps = num_train_steps
    config.eval.every_steps = every_steps
    config.checkpoint.every_steps = every_steps
    return config


def pretrain_config(head: str = "mlm") -> ml_collections.ConfigDict:
    """BERT's masked-LM pre-training settings (batch 256, lr 1e-4, 1% warmup), 100k steps."""
    config = stage_config("pretrain", head, 1e-4, 100_000, every_steps=2_000)
    config.train.global_batch_size = 256
    config.train.warmup_proportion = 0.01
    config.eval.every_steps = 5_000
    config.eval.global_batch_size = 256
    return config


def pd_config(arg: str | None, source: str, task: str, transfer: str) -> ml_collections.ConfigDict:
    """The Pre-trained Distillation pipeline config (``bert_mini.pipeline``) for one GLUE task.

    Every stage is a complete run config (``stage_pretrain``, ``stage_teacher``, ``stage_distill``,
    ``stage_finetune``) that the pipeline wires together (init checkpoints, teacher logits, task),
    so any of its fields can be overridden: ``--config.stage_distill.train.learning_rate=3e-5``.
    """
    args = parse_arg(arg, PD_ARGS, source)
    task = str(args.get("task", task))
    regression = task == "stsb"
    config = ml_collections.ConfigDict()
    config.mode = "pipeline"
    config.workdir = ""
    config.seed = 0

    config.pipeline = ml_collections.ConfigDict()
    config.pipeline.task = task
    config.pipeline.method = str(args.get("method", "pd"))  # pd | pdf | pf | d | scratch
    config.pipeline.student = canonical_variant(str(args.get("student", "mini")))
    config.pipeline.student_init = str(args.get("student_init", ""))  # "" = pre-train it
    config.pipeline.teacher = str(args.get("teacher", ""))  # a fine-tuned teacher, used as is
    config.pipeline.teacher_init = str(args.get("teacher_init", DEFAULT_TEACHER_INIT))
    config.pipeline.shared_dir = ""  # student pre-training, teacher, logits; "" = the workdir
    config.pipeline.data_dir = ""  # default: $BERT_MINI_DATA or ../shared/data
    config.pipeline.tfds_dir = ""
    config.pipeline.max_seq_length = 128  # evaluation and test predictions
    config.pipeline.predict_batch_size = 128  # teacher logits, evaluation, test predictions
    config.pipeline.logits_shard_size = 16_384  # examples per cached teacher-logits file
    config.pipeline.logits_top_k = 0  # >0 keeps only the k largest logits per example
    config.pipeline.predict_test = True  # write GLUE test predictions

    head = "regression" if regression else "classification"
    config.stage_pretrain = pretrain_config()
    # BERT-Large: lr 2e-5, ~3 epochs of SST-2 at batch 32.
    config.stage_teacher = stage_config("finetune", head, 2e-5, 6_300, every_steps=1_000)
    config.stage_distill = stage_config("distill", head, 1e-4, 20_000, every_steps=2_000)
    config.stage_distill.data.transfer = transfer
    # Compact models: the paper's best is often lr 1e-4; ~4 epochs of SST-2 at batch 32.
    config.stage_finetune = stage_config("finetune", head, 1e-4, 8_400, every_steps=1_000)

    if config.pipeline.method not in PD_METHODS:
        raise ValueError(f"{source}: method={config.pipeline.method!r}; choose one of {PD_METHODS}")
    if args.get("runlocal"):
        _pd_runlocal(config, "student" in args)
    return config


def _pd_runlocal(config: ml_collections.ConfigDict, student_given: bool) -> None:
    """Every stage in seconds on a CPU: BERT-Tiny student, the staged MiniLM as the teacher to
    fine-tune, a few hundred transfer examples, tens of steps."""
    if not student_given:
        config.pipeline.student = "L-2_H-128"
    if config.pipeline.teacher_init == DEFAULT_TEACHER_INIT:
        config.pipeline.teacher_init = str(shared_data_dir() / "checkpoints" / "all-minilm-l6-v2")
    config.pipeline.max_seq_length = 64
    config.pipeline.logits_shard_size = 128
    for section in ("stage_pretrain", "stage_teacher", "stage_distill", "stage_finetune"):
        stage = config[section]
        stage.data.max_seq_length = 64
        stage.data.trim_multiple = 0  # one compiled shape per step: compiling dominates here
        apply_runlocal(stage)
        stage.train.num_train_steps = 20
        stage.eval.every_steps = 20
        stage.checkpoint.every_steps = 10
    pretrain = config.stage_pretrain
    pretrain.data.train_files = "pretrain/gutenberg/valid.txt.gz"
    pretrain.data.eval_files = "pretrain/wikitext-2-raw/wiki.valid.raw"
    pretrain.data.max_examples = 1_024
    pretrain.data.max_eval_examples = 128
    pretrain.data.max_predictions_per_seq = 10
    pretrain.train.learning_rate = 5e-4
    config.stage_teacher.data.max_examples = 512
    config.stage_teacher.train.learning_rate = 5e-5
    config.stage_distill.data.max_examples = 512
    config.stage_distill.train.learning_rate = 5e-4
    config.stage_finetune.data.max_examples = 512
    config.stage_finetune.train.learning_rate = 5e-4
