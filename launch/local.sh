#!/usr/bin/env bash
# N cooperating CPU processes of one bert_mini job on this machine, each with fake devices and
# jax.distributed through a coordinator on localhost: the multi-host path, without a cluster.
#
#   launch/local.sh --processes=2 --devices-per-process=4 -- \
#       --config=configs/pretrain_mlm.py:runlocal --workdir=/tmp/bert_mini/mlm_2x4
#
# The work is done by bert_mini/launch_local.py (--help lists every option); PYTHON picks the
# interpreter (default: the repo's .venv if there is one, else python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then
    PYTHON="$repo/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m bert_mini.launch_local "$@"
