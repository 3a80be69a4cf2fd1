"""Pre-train BERT-Base with masked LM on a Cloud TPU v5e-64 pod slice (16 hosts x 4 chips = 64).

    launch/tpu_vm.sh all --name=bert-base-v5e-64 --zone=us-west4-a --accelerator-type=v5litepod-64 \
        --bucket=gs://MY_BUCKET --run=base_v5e_64 -- --config=configs/tpu/v5e_64.py

Every worker runs: python -m bert_mini.main --config=configs/tpu/v5e_64.py --workdir=$HOME/gcs/bert_mini/runs/base_v5e_64

Mesh data=8 x fsdp=4 x tensor=2: v5e chips have 16 GB each, so parameters and Adam moments are
sharded over fsdp (4) and the attention heads / MLP / vocab over tensor (2); the batch is split
over data x fsdp = 32 ways. Global batch 1024 (32 rows per batch shard, 64 per host) with the
learning rate scaled by sqrt(1024 / 256) from BERT's 1e-4, for a quarter of the steps.
bf16 compute, fp32 parameters. Argument: ``variant`` (default base).
"""

from bert_mini import config_lib

ACCELERATOR, DEVICES, HOSTS = "v5litepod-64", 64, 16
KNOWN_ARGS = {"variant"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/tpu/v5e_64.py")
    config = config_lib.pretrain_config()  # BERT's MLM recipe: batch 256, lr 1e-4
    config.model.variant = str(args.get("variant", "base"))
    config.model.dtype = "bfloat16"
    config.train.log_every_steps = 100
    config.train.global_batch_size = 1024
    config.train.learning_rate = 2e-4
    config.train.num_train_steps = 250_000
    config.eval.global_batch_size = 1024
    config.checkpoint.every_steps = 2_500
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 8, 4, 2
    return config
