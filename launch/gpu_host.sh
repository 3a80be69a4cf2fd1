#!/usr/bin/env bash
# One host with several GPUs: one process drives all of them (JAX sees every visible GPU as a
# device of one mesh), so no distributed runtime is needed. Run with --help for the options.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_host.sh [--gpus=0,1,...] [--mem-fraction=F] [--dry-run] -- MAIN_ARGS...

Runs `python -m bert_mini.main MAIN_ARGS` as one process over the GPUs of this host (install
JAX for CUDA first: pip install -e . 'jax[cuda12]'). For several hosts use launch/slurm.sh.

Options:
  --gpus=LIST         GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
  --mem-fraction=F    share of each GPU's memory JAX preallocates, in (0, 1] (default: JAX's 0.75)
  --dry-run           print the command, run nothing
  -h, --help          this help

The config's mesh must fit the GPU count (e.g. --config.mesh.data=-1 takes them all), and the
global batch must divide over the data x fsdp axes. PYTHON picks the interpreter (default: the
repo's .venv if there is one, else python3).

Example (4 GPUs, BERT-Mini pre-training in bfloat16):
  launch/gpu_host.sh --gpus=0,1,2,3 -- --config=configs/pretrain_mlm.py:variant=mini \
      --config.model.dtype=bfloat16 --workdir=runs/mini_4gpu
USAGE
}

gpus="" mem_fraction=""
main_args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --gpus=*) gpus="${1#*=}" ;;
    --mem-fraction=*) mem_fraction="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; main_args=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

((${#main_args[@]})) || die "give bert_mini.main's arguments after --, e.g. -- --config=... --workdir=..."
if [[ -n "$gpus" ]]; then
  matches "$gpus" '^[0-9]+(,[0-9]+)*$' --gpus "a comma-separated list of GPU indices"
fi
if [[ -n "$mem_fraction" ]]; then
  matches "$mem_fraction" '^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$' --mem-fraction "a number in (0, 1]"
fi
if [[ "$DRY_RUN" != 1 ]] && ! command -v nvidia-smi >/dev/null; then
  die "nvidia-smi not found: no NVIDIA driver on this host (use --dry-run to see the command)"
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then
    PYTHON="$repo/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi

env_vars=(BERT_MINI_DISTRIBUTED=0 JAX_PLATFORMS=cuda "PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}")
if [[ -n "$gpus" ]]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
fi
if [[ -n "$mem_fraction" ]]; then
  env_vars+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
fi
run env "${env_vars[@]}" "$PYTHON" -m bert_mini.main "${main_args[@]}"
