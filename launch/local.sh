#!/usr/bin/env bash
# Train on this machine: one process over all local devices, or N local processes
# (one per GPU, or CPU processes for testing) joined by jax.distributed on localhost.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/local.sh [--dry-run] [--processes N] [--port P] CONFIG WORKDIR [TRAIN_FLAGS...]

  CONFIG       config name in configs/ (demo, finetune, piccolo2, stsb, distill) or a path
  WORKDIR      run directory (checkpoints, logs, exported model)
  --processes  start N processes with a localhost coordinator (default 1);
               with GPUs each process gets one: CUDA_VISIBLE_DEVICES=i
  --port       coordinator port (default 12355)
  --dry-run    print the commands instead of running them
  TRAIN_FLAGS  passed on, e.g. --config.optim.lr=2e-5
USAGE
}

dry=0 procs=1 port=12355 py=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --processes) procs=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
config=$1 workdir=$2; shift 2

run() { if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ $procs == 1 ]]; then
  run "$py" -m piccolo_jax.train "--config=$config" "--workdir=$workdir" "$@"
  exit
fi
pids=()
for ((i = 0; i < procs; i++)); do
  cmd=("$py" -m piccolo_jax.train "--config=$config" "--workdir=$workdir"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$procs" "--process_id=$i" "$@")
  if [[ $dry == 1 ]]; then
    echo "CUDA_VISIBLE_DEVICES=$i $(printf '%q ' "${cmd[@]}")"
  else
    CUDA_VISIBLE_DEVICES=$i "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
