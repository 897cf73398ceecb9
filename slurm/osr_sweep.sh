#!/usr/bin/env bash
# The small-scale benchmark sweep as a job array: data sets x splits x methods, one array
# task per combination, each in its own run folder <run.output_dir>/<tag><dataset>_<method>_<split>
# (what the reference run.sh meant to do, serially and with hard-coded paths).
#
#   bash slurm/osr_sweep.sh --list                 # the grid and the --array range it needs
#   sbatch slurm/osr_sweep.sh [key=value ...]      # 3 data sets x 5 splits x 3 methods = 45 tasks
#   SWEEP_DATASETS="cifar10 svhn" SWEEP_METHODS=rcssr sbatch --array=0-9%4 slurm/osr_sweep.sh data.root=/data
#
# Grid (environment): SWEEP_DATASETS (default "cifar10 svhn tinyimagenet"), SWEEP_METHODS
# (default "linear pcssr rcssr"), SWEEP_SPLITS (default: each data set's own family: a-e for
# the CSSR splits of cifar10/svhn/tinyimagenet, 0-4 for ARPL ones, "default" for
# fashion_mnist), SWEEP_TAG (run-name prefix), SWEEP_SEEDS (optional: seeds per combination;
# then run names end in _s<seed>, as tools/sweep.py names them). Task i runs
# configs/<dataset>/<method>.yaml with data.split=<split> plus the overrides given here.
# tools/sweep.py --slurm submits only the unfinished tasks of a grid. A task resubmitted later resumes
# (or, when finished, re-evaluates) its run. Preemption/requeue as in imagenet_rcssr.sh.
#SBATCH --job-name=cssr-osr-sweep
#SBATCH --array=0-44%8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

ROOT=${CSSR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

splits_of() {
  if [[ -n ${SWEEP_SPLITS:-} ]]; then echo "$SWEEP_SPLITS"; return; fi
  case $1 in
    cifar10|svhn|tinyimagenet) echo "a b c d e" ;;
    cifar_plus10|cifar_plus50|mnist|fashion_mnist) echo "0 1 2 3 4" ;;
    *) echo "error: no default splits for data set '$1'; set SWEEP_SPLITS" >&2; return 2 ;;
  esac
}

grid() {  # one "dataset split method [seed]" line per task, in task-index order
  local ds split method seed
  for ds in ${SWEEP_DATASETS:-cifar10 svhn tinyimagenet}; do
    for split in $(splits_of "$ds"); do
      for method in ${SWEEP_METHODS:-linear pcssr rcssr}; do
        if [[ -n ${SWEEP_SEEDS:-} ]]; then
          for seed in $SWEEP_SEEDS; do echo "$ds $split $method $seed"; done
        else
          echo "$ds $split $method"
        fi
      done
    done
  done
}

mapfile -t TASKS < <(grid)
(( ${#TASKS[@]} > 0 )) || { echo "error: empty sweep grid" >&2; exit 2; }
if [[ ${1:-} == --list ]]; then
  for i in "${!TASKS[@]}"; do echo "$i ${TASKS[$i]}"; done
  echo "submit with: sbatch --array=0-$(( ${#TASKS[@]} - 1 ))%8 slurm/osr_sweep.sh [key=value ...]"
  exit 0
fi

INDEX=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=0-$(( ${#TASKS[@]} - 1 ))}
(( INDEX < ${#TASKS[@]} )) || { echo "error: array index $INDEX outside the ${#TASKS[@]}-task grid (see --list)" >&2; exit 2; }
read -r DATASET SPLIT METHOD SEED <<<"${TASKS[$INDEX]}"
CONFIG=configs/$DATASET/$METHOD.yaml
[[ -f $ROOT/$CONFIG ]] || { echo "error: no config $CONFIG for task $INDEX" >&2; exit 2; }
echo "sweep task $INDEX/${#TASKS[@]}: $DATASET split $SPLIT $METHOD${SEED:+ seed $SEED}"

# shellcheck source=slurm/job.sh
source "$ROOT/slurm/job.sh"
SEED_ARGS=()
[[ -z $SEED ]] || SEED_ARGS=("run.seed=$SEED")
cssr_run_job "${SWEEP_TAG:+${SWEEP_TAG}_}${DATASET}_${METHOD}_${SPLIT}${SEED:+_s$SEED}" "$CONFIG" "data.split=$SPLIT" \
  "${SEED_ARGS[@]}" "$@"
