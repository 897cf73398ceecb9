#!/usr/bin/env bash
# RCSSR fine-tuning on ImageNet-1k (WebDataset shards) on N nodes x G GPUs, surviving
# preemption. Submit from the repository root (see docs/distributed.md):
#
#   sbatch slurm/imagenet_rcssr.sh                               # configs/imagenet/rcssr.yaml, 2 x 8 GPUs
#   sbatch --nodes=4 slurm/imagenet_rcssr.sh                     # 4 x 8 GPUs, same run otherwise
#   sbatch slurm/imagenet_rcssr.sh [CONFIG] [key=value ...]      # any config and overrides
#   sbatch slurm/imagenet_rcssr.sh configs/imagenet/rcssr.yaml run.name=imagenet_rcssr_1234  # continue a run
#
# The run folder is <run.output_dir>/<config dir>_<config name>_<job id> unless run.name is
# given; a requeued job keeps its id and so resumes its own run folder (and W&B run).
# Before srun, on the batch host: the pre-flight (cssr_dist/engine/preflight.py: config, every shard
# index, the weight file, the output folder); a problem ends the job with one line each, exit 2.
# tools/sweep.py --slurm submits this script once per ImageNet run with --partition/--account/
# --nodes/--gpus-per-node/--cpus-per-task/--time (docs/distributed.md, "Sweeps on a cluster").
# Per node: one launcher (launchers/launch.py = accelerate launch + exit-code/signal
# handling) started by srun, machine rank = SLURM_NODEID, one process per GPU, rendezvous
# on the first node (MASTER_ADDR/MASTER_PORT override it). Node logs:
# <run>/slurm/<job id>.<restart>/node<N>.log; this script's output: slurm-<name>-<job id>.out.
# Preemption: 180 s before the time limit Slurm sends USR1 to every process of the step;
# the workers finish their step, write a checkpoint and exit 42; this script then runs
# `scontrol requeue`, and the restarted job resumes from the checkpoint.
# Knobs (environment): see slurm/job.sh.
#SBATCH --job-name=cssr-imagenet-rcssr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=08:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

ROOT=${CSSR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/job.sh
source "$ROOT/slurm/job.sh"

CONFIG=configs/imagenet/rcssr.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then  # a first argument that is not key=value names the config
  CONFIG=$1
  shift
fi
[[ -f $ROOT/$CONFIG || -f $CONFIG ]] || { echo "error: config $CONFIG not found (from $ROOT)" >&2; exit 2; }
stem=${CONFIG%.yaml}
NAME="$(basename "$(dirname "$stem")")_$(basename "$stem")_${SLURM_JOB_ID}"

cssr_run_job "$NAME" "$CONFIG" "$@"
