"""Pre-train BERT-Mini with masked LM on a Cloud TPU v4-8 (1 host, 4 chips = 4 JAX devices).

    launch/tpu_vm.sh all --name=bert-mini-v4-8 --zone=us-central2-b --accelerator-type=v4-8 \
        --bucket=gs://MY_BUCKET --run=mini_v4_8 -- --config=configs/tpu/v4_8.py

On the VM itself: python -m bert_mini.main --config=configs/tpu/v4_8.py --workdir=$HOME/gcs/bert_mini/runs/mini_v4_8

Mesh data=4 (plain data parallelism): BERT-Mini's 11M parameters fit each chip many times over,
so replicating them is fastest. Global batch 256 = 64 per chip, bf16 compute with fp32
parameters. Argument: ``variant`` (default mini) to pre-train another size on the same slice.
"""

from bert_mini import config_lib

ACCELERATOR, DEVICES, HOSTS = "v4-8", 4, 1
KNOWN_ARGS = {"variant"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, KNOWN_ARGS, "configs/tpu/v4_8.py")
    config = config_lib.pretrain_config()  # BERT's MLM recipe: batch 256, lr 1e-4
    config.model.variant = str(args.get("variant", "mini"))
    config.model.dtype = "bfloat16"
    config.train.log_every_steps = 100
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 1
    return config
