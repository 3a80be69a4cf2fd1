#!/usr/bin/env bash
# GPU clusters under SLURM: submits itself with sbatch; inside the allocation it starts one task
# per GPU with srun, and points jax.distributed at the allocation's first node. Run with --help.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder, in the checkout (--chdir below).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$repo/launch/common.sh" && -f "$PWD/launch/common.sh" ]]; then
  repo="$PWD"
fi
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh [options] -- MAIN_ARGS...

Outside an allocation: submits this script with sbatch (one task per GPU on every node).
Inside one (SLURM_JOB_ID set: the batch job, or an salloc shell): runs
`python -m bert_mini.main MAIN_ARGS` on every task with srun. The coordinator of
jax.distributed is the allocation's first node (scontrol show hostnames), given to every task
as BERT_MINI_COORDINATOR; JAX reads the process count and index (and each task's GPU) from
SLURM's environment.

Options (submission):
  --nodes=N            nodes (default 1)
  --gpus-per-node=G    GPUs per node = tasks per node (default 8)
  --cpus-per-task=C    CPU cores per task, for the input pipeline (default 8)
  --partition=P        SLURM partition (default: the cluster's)
  --account=A          SLURM account (default: yours)
  --time=T             time limit, e.g. 24:00:00 (default: the partition's)
  --job-name=NAME      job name (default bert_mini)
Options (both):
  --port=PORT          coordinator port (default: 61440 + job id % 4096, as JAX picks)
  --dry-run            print the sbatch / srun command, run nothing
  -h, --help           this help

The job runs in this checkout (sbatch --chdir), so relative paths in MAIN_ARGS are relative
to it. PYTHON picks the interpreter on the nodes (default python3); the checkout must be on a
filesystem every node sees, and so must --workdir (all processes write one checkpoint).

Example (2 nodes x 8 GPUs, BERT-Base pre-training):
  launch/slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=48:00:00 -- \
      --config=configs/pretrain_mlm.py:variant=base --config.model.dtype=bfloat16 \
      --workdir=/shared/runs/base_2x8
USAGE
}

nodes=1 gpus_per_node=8 cpus_per_task=8 partition="" account="" time_limit="" job_name=bert_mini
port=""
main_args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus_per_node="${1#*=}" ;;
    --cpus-per-task=*) cpus_per_task="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; main_args=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

((${#main_args[@]})) || die "give bert_mini.main's arguments after --, e.g. -- --config=... --workdir=..."
matches "$nodes" '^[1-9][0-9]*$' --nodes "a positive integer"
matches "$gpus_per_node" '^[1-9][0-9]*$' --gpus-per-node "a positive integer"
matches "$cpus_per_task" '^[1-9][0-9]*$' --cpus-per-task "a positive integer"
matches "$job_name" '^[A-Za-z0-9._-]+$' --job-name "a job name (letters, digits, . _ -)"
if [[ -n "$time_limit" ]]; then
  matches "$time_limit" '^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$' --time "a SLURM time like 24:00:00"
fi
if [[ -n "$port" ]]; then
  matches "$port" '^[1-9][0-9]{0,4}$' --port "a TCP port"
  ((port < 65536)) || die "--port=$port is not a TCP port"
fi

submit() {
  local options=(
    --nodes="$nodes" --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node"
    --cpus-per-task="$cpus_per_task" --job-name="$job_name" --output="$job_name-%j.out"
    --chdir="$repo"
  )
  if [[ -n "$partition" ]]; then
    options+=(--partition="$partition")
  fi
  if [[ -n "$account" ]]; then
    options+=(--account="$account")
  fi
  if [[ -n "$time_limit" ]]; then
    options+=(--time="$time_limit")
  fi
  local passed=()
  if [[ -n "$port" ]]; then
    passed+=(--port="$port")
  fi
  if [[ "$DRY_RUN" != 1 ]] && ! command -v sbatch >/dev/null; then
    die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
  fi
  run sbatch "${options[@]}" "$repo/launch/slurm.sh" "${passed[@]}" -- "${main_args[@]}"
}

step() {
  command -v scontrol >/dev/null || die "scontrol not found: SLURM_JOB_ID is set but SLURM is not"
  local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  [[ -n "$nodelist" ]] || die "SLURM_JOB_NODELIST is not set: not inside an allocation"
  local hosts=()
  mapfile -t hosts < <(scontrol show hostnames "$nodelist")
  ((${#hosts[@]})) || die "scontrol listed no host for $nodelist"
  [[ "$SLURM_JOB_ID" =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID=$SLURM_JOB_ID is not a job id"
  local coordinator_port="${port:-$((61440 + SLURM_JOB_ID % 4096))}"
  local coordinator="${hosts[0]}:$coordinator_port"
  echo "coordinator $coordinator; ${#hosts[@]} node(s): ${hosts[*]}"
  run srun --kill-on-bad-exit=1 \
    --export="ALL,BERT_MINI_DISTRIBUTED=1,BERT_MINI_COORDINATOR=$coordinator" \
    "${PYTHON:-python3}" -m bert_mini.main "${main_args[@]}"
}

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  step
else
  submit
fi
