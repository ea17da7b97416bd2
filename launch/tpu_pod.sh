#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: optionally create it, install on every worker, run
# the same train command on all workers (jax.distributed auto-detects the pod).
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/tpu_pod.sh [--dry-run] [--create] --name NAME --zone ZONE
                         [--accelerator v5p-32] [--version tpu-ubuntu2204-base]
                         [--repo URL] [--ref main] CONFIG WORKDIR [TRAIN_FLAGS...]

  --create   create the TPU VM slice first (else reuse NAME)
  --repo     git URL to clone on the workers (default: this checkout's origin)
  WORKDIR    a local path on each worker (logs, export on worker 0); put checkpoints in a
             bucket with --config.checkpoint.dir=gs://BUCKET/run so a preempted or recreated
             slice resumes from them.
  --dry-run  print the gcloud commands instead of running them
USAGE
}

dry=0 create=0 name="" zone="" accel="v5p-32" version="tpu-ubuntu2204-base" ref="main"
repo=$(git config --get remote.origin.url 2>/dev/null || echo "")
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --create) create=1; shift ;;
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accel=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 && -n $name && -n $zone && -n $repo ]] || { usage >&2; exit 2; }
config=$1 workdir=$2; shift 2

run() { if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ $create == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" --version="$version"
fi
extra=""
[[ $# -eq 0 ]] || extra=$(printf '%q ' "$@")
remote="set -e; [ -d piccolo_jax ] || git clone -q $repo piccolo_jax; cd piccolo_jax
git fetch -q origin $ref && git checkout -q FETCH_HEAD
python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q 'jax[tpu]' -e .
.venv/bin/python -m piccolo_jax.train --config=$config --workdir=$workdir $extra"
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
