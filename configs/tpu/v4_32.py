"""Pre-train BERT-Base with masked LM on a Cloud TPU v4-32 pod slice (4 hosts x 4 chips = 16).

    launch/tpu_vm.sh all --name=bert-base-v4-32 --zone=us-central2-b --accelerator-type=v4-32 \
        --bucket=gs://MY_BUCKET --run=base_v4_32 -- --config=configs/tpu/v4_32.py

Every worker runs: python -m bert_mini.main --config=configs/tpu/v4_32.py --workdir=$HOME/gcs/bert_mini/runs/base_v4_32

Mesh data=4 x fsdp=4: the batch is split 16 ways, and parameters plus Adam moments are sharded
over the 4 chips of each fsdp group, so BERT-Base's optimizer state takes a quarter of the
memory it would take replicated; each host feeds 256 / 4 = 64 rows per step. bf16 compute,
fp32 parameters. Argument: ``variant`` (default base), e.g. ``variant=L-12_H-512``.
"""

from bert_mini import config_lib

ACCELERATOR, DEVICES, HOSTS = "v4-32", 16, 4
KNOWN_ARGS = {"variant"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/tpu/v4_32.py")
    config = config_lib.pretrain_config()  # BERT's MLM recipe: batch 256, lr 1e-4
    config.model.variant = str(args.get("variant", "base"))
    config.model.dtype = "bfloat16"
    config.train.log_every_steps = 100
    config.train.num_train_steps = 1_000_000  # BERT's recipe: 1M steps of 256 x 128 tokens
    config.eval.every_steps = 10_000
    config.checkpoint.every_steps = 5_000
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 4, 1
    return config
