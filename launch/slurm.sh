#!/usr/bin/env bash
# Submit a multi-node GPU job to SLURM: one task per GPU; jax.distributed.initialize()
# reads the coordinator, process count and index from SLURM's environment.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P]
                       [--time HH:MM:SS] [--venv DIR] CONFIG WORKDIR [TRAIN_FLAGS...]

  Writes WORKDIR/job.sbatch and submits it with sbatch (--dry-run prints both instead).
  WORKDIR must be on a filesystem every node sees (checkpoints are written collectively).
  Defaults: 1 node, 8 GPUs per node, 24:00:00, venv .venv in the current directory.
USAGE
}

dry=0 nodes=1 gpus=8 partition="" time="24:00:00" venv="$PWD/.venv"
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
config=$1 workdir=$2; shift 2
extra=""
[[ $# -eq 0 ]] || extra=$(printf '%q ' "$@")

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=piccolo_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-task=1
#SBATCH --time=$time
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
set -euo pipefail
cd $(printf '%q' "$PWD")
source $(printf '%q' "$venv")/bin/activate
srun python -m piccolo_jax.train --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir") $extra
SBATCH
)

if [[ $dry == 1 ]]; then
  echo "# $workdir/job.sbatch"
  echo "$script"
  echo "# submit:"
  echo "sbatch $workdir/job.sbatch"
else
  mkdir -p "$workdir"
  echo "$script" > "$workdir/job.sbatch"
  sbatch "$workdir/job.sbatch"
fi
