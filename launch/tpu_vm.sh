#!/usr/bin/env bash
# Cloud TPU VMs: create a TPU VM or pod slice, install bert_mini on every worker, run the same
# `python -m bert_mini.main ...` on all workers at once, stream the logs, copy the results from
# the GCS workdir, delete the VM. Run with --help for the commands and options.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh COMMAND [options] [-- MAIN_ARGS...]

Runs bert_mini on a Cloud TPU VM or pod slice with gcloud. Every worker runs the same
`python -m bert_mini.main MAIN_ARGS`; JAX's distributed runtime finds the other workers itself
(BERT_MINI_DISTRIBUTED=1, no coordinator to give). The workdir lives in a GCS bucket that every
worker mounts with gcsfuse at ~/gcs, because multi-host Orbax checkpoints need one directory
that all hosts write into; the data is read from the same bucket.

Commands:
  create   create the TPU VM (needs --accelerator-type)
  setup    copy this checkout to every worker, pip install it with jax[tpu] (user site),
           mount the bucket
  run      run bert_mini.main on all workers (--worker=all), streaming their output
  logs     follow the log of a --detach'ed run on worker 0
  copy     copy the run's workdir from GCS to --dest
  delete   delete the TPU VM
  all      create, setup, run, copy, delete (the VM is deleted even if the run fails,
           unless --keep)

Options:
  --name=NAME               TPU VM name (required)
  --zone=ZONE               zone, e.g. us-central2-b (v4) or us-west4-a (v5e) (required)
  --accelerator-type=TYPE   slice, e.g. v4-8, v4-32, v5litepod-64 (create, all)
  --version=RUNTIME         TPU software version (default: tpu-ubuntu2204-base; v2-alpha-tpuv5-lite
                            for v5litepod-*)
  --project=PROJECT         gcloud project (default: gcloud's configured project)
  --spot                    create a Spot VM (cheaper, may be preempted; rerun resumes)
  --bucket=gs://BUCKET      bucket with the data (gs://BUCKET/bert_mini/data) and the runs
                            (gs://BUCKET/bert_mini/runs/RUN) (setup, run, copy, all)
  --run=RUN                 run name: the workdir is gs://BUCKET/bert_mini/runs/RUN (run, copy,
                            logs, all)
  --dest=DIR                where `copy` puts the workdir (default: ./runs/RUN)
  --detach                  run: start in the background on every worker (follow with `logs`)
  --keep                    all: keep the VM at the end
  --dry-run                 print the gcloud commands, run nothing
  -h, --help                this help

MAIN_ARGS (after --) go to bert_mini.main unchanged; --workdir is set from --run.

Example (BERT-Mini pre-training on a v4-8; the data uploaded once with
`gcloud storage cp -r ../shared/data gs://my-bucket/bert_mini/data`):
  launch/tpu_vm.sh all --name=bert-mini --zone=us-central2-b --accelerator-type=v4-8 \
      --bucket=gs://my-bucket --run=mini_v4_8 -- --config=configs/tpu/v4_8.py
USAGE
}

command="" name="" zone="" accelerator="" version="" project="" bucket="" run_name="" dest=""
spot=0 detach=0 keep=0
main_args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator-type=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --run=*) run_name="${1#*=}" ;;
    --dest=*) dest="${1#*=}" ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --keep) keep=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; main_args=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$command" ]] || die "one command only, got '$command' and '$1'"
      command="$1"
      ;;
  esac
  shift
done

case "$command" in
  create | setup | run | logs | copy | delete | all) ;;
  "") die "a command is required: create, setup, run, logs, copy, delete or all (see --help)" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac
need "$name" --name
matches "$name" '^[a-z]([-a-z0-9]*[a-z0-9])?$' --name "a TPU name (lower case, digits, -)"
need "$zone" --zone
matches "$zone" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' --zone "a zone like us-central2-b"
if [[ "$command" == create || "$command" == all ]]; then
  need "$accelerator" --accelerator-type
  matches "$accelerator" '^v[0-9]+[a-z]*-[0-9]+$' --accelerator-type "a TPU type like v4-32"
fi
if [[ "$command" =~ ^(setup|run|copy|all)$ ]]; then
  need "$bucket" --bucket
  matches "$bucket" '^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9]$' --bucket "a bucket like gs://my-bucket"
fi
if [[ "$command" =~ ^(run|logs|copy|all)$ ]]; then
  need "$run_name" --run
  matches "$run_name" '^[A-Za-z0-9._-]+$' --run "a run name (letters, digits, . _ -)"
fi
if [[ "$command" == run || "$command" == all ]]; then
  ((${#main_args[@]})) || die "give bert_mini.main's arguments after --, e.g. -- --config=..."
  for arg in "${main_args[@]}"; do
    [[ "$arg" != --workdir=* ]] || die "--workdir is set from --run; do not pass it after --"
  done
fi
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
fi

bucket_name="${bucket#gs://}"
gcs_runs="$bucket/bert_mini/runs"
remote_workdir="\$HOME/gcs/bert_mini/runs/$run_name"
remote_log="\$HOME/bert_mini_$run_name.log"
scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi

# on_workers WORKER SCRIPT: run a shell script on the given worker(s) over gcloud ssh.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker="$1" --command="$2"
}

do_create() {
  local extra=()
  if ((spot)); then
    extra+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$name" "${scope[@]}" \
    --accelerator-type="$accelerator" --version="$version" "${extra[@]}"
}

do_setup() {
  local tarball="${TMPDIR:-/tmp}/bert_mini_src_$name.tar.gz"
  run tar -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs -C "$repo" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:bert_mini_src.tar.gz" \
    "${scope[@]}" --worker=all
  # gcsfuse from Google's apt repository (docs: cloud.google.com/storage/docs/cloud-storage-fuse).
  local gcsfuse_repo="https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"
  local keyring=/usr/share/keyrings/cloud.google.asc
  local steps=(
    "set -euo pipefail"
    "rm -rf \$HOME/bert_mini"
    "mkdir -p \$HOME/bert_mini"
    "tar -xzf \$HOME/bert_mini_src.tar.gz -C \$HOME/bert_mini"
    "python3 -m pip install --user -q -e \$HOME/bert_mini 'jax[tpu]>=0.6,<0.13'"
    "if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=$keyring] $gcsfuse_repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $keyring >/dev/null; sudo apt-get update -q; sudo apt-get install -q -y gcsfuse; fi"
    "mkdir -p \$HOME/gcs"
    "mountpoint -q \$HOME/gcs || gcsfuse --implicit-dirs $bucket_name \$HOME/gcs"
    "mkdir -p \$HOME/gcs/bert_mini/runs"
  )
  local script
  script="$(printf '%s; ' "${steps[@]}")"
  on_workers all "$script"
}

do_run() {
  local main_command script
  main_command="cd \$HOME/bert_mini && BERT_MINI_DISTRIBUTED=1 BERT_MINI_DATA=\$HOME/gcs/bert_mini/data"
  main_command+=" python3 -m bert_mini.main --workdir=$remote_workdir"
  main_command+=" $(quote "${main_args[@]}")"
  if ((detach)); then
    script="nohup bash -c $(quote "$main_command") >$remote_log 2>&1 </dev/null &"
  else
    script="set -o pipefail; $main_command 2>&1 | tee $remote_log"
  fi
  on_workers all "$script"
}

do_logs() {
  on_workers 0 "tail -n +1 -F $remote_log"
}

do_copy() {
  local target="${dest:-runs/$run_name}"
  run mkdir -p "$(dirname "$target")"
  run gcloud storage cp --recursive "$gcs_runs/$run_name" "$target"
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$name" "${scope[@]}" --quiet
}

case "$command" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  copy) do_copy ;;
  delete) do_delete ;;
  all)
    do_create
    if ((keep)); then
      echo "keeping $name: delete it with launch/tpu_vm.sh delete --name=$name --zone=$zone"
    else
      trap do_delete EXIT # also when a step fails: an idle slice costs; the workdir is in GCS
    fi
    do_setup
    do_run
    do_copy
    ;;
esac
