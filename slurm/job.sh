# Shared by slurm/imagenet_rcssr.sh and slurm/osr_sweep.sh (sourced, not submitted).
#
#   cssr_run_job RUN_NAME CONFIG [key=value ...]
#
# runs train.py on every node of the allocation: one launcher per node (srun), one process
# per GPU, and requeues the job when the run was preempted (exit code 42). Environment:
#   CSSR_ROOT        repository (default: the submit directory)
#   CSSR_PYTHON      python with cssr-dist installed (default: $CSSR_ROOT/.venv/bin/python)
#   PROCS_PER_NODE   processes per node (default: GPUs of the node from Slurm, else nvidia-smi, else 1)
#   MASTER_ADDR      rendezvous host (default: the first node of the job); set 127.0.0.1 on
#                    test clusters whose node names do not resolve
#   MASTER_PORT      rendezvous port (default: a port free on the batch host when the job starts)
#   LAUNCH_CONFIG    an Accelerate config file to start from (explicit flags below win)
#   MIXED_PRECISION  passed to accelerate launch (default: no; train.py uses run.mixed_precision)
#   MAX_REQUEUES     stop requeueing after this many restarts (default 20)
#   SRUN_WAIT        seconds the other nodes may run on after the first node's launcher ended (default 120;
#                    raise it if the final W&B upload on rank 0 takes longer)
#   CSSR_DIST_TIMEOUT_S  collective timeout (default here 600; torch: 30 min gloo / 10 min NCCL)
#   CSSR_TMPDIR      TMPDIR for the launchers and workers (default: the node's; keep it short, see launch.py)
#   ACCELERATE_USE_CPU=1  CPU processes over gloo (tests, CPU clusters)

REQUEUE_EXIT_CODE=42

cssr_procs_per_node() {
  if [[ -n ${PROCS_PER_NODE:-} ]]; then echo "$PROCS_PER_NODE"; return; fi
  if [[ -n ${ACCELERATE_USE_CPU:-} && ${ACCELERATE_USE_CPU} != 0 ]]; then echo 1; return; fi
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  echo $(( n > 0 ? n : 1 ))
}

cssr_run_job() {
  local name=$1 config=$2
  shift 2
  local root=${CSSR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$root"
  local py=${CSSR_PYTHON:-$root/.venv/bin/python}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
  export CSSR_DIST_TIMEOUT_S=${CSSR_DIST_TIMEOUT_S:-600}

  # Pre-flight, once, here, before N nodes start: the config, every shard index (train, test,
  # each OOD set, one shard per process at least), the weight file, the output folder
  # (cssr_dist/engine/preflight.py); one line per problem and exit 2. Prints the run folder.
  local nnodes=${SLURM_NNODES:-1} per_node total
  per_node=$(cssr_procs_per_node)
  total=$(( nnodes * per_node ))
  local run_dir
  run_dir=$("$py" -m cssr_dist.apps.preflight --processes "$total" --config "$config" "run.name=$name" "$@") || return 2

  local restart=${SLURM_RESTART_COUNT:-0}
  local log_dir=$run_dir/slurm/${SLURM_JOB_ID}.${restart}
  mkdir -p "$log_dir"
  if [[ -n ${CSSR_TMPDIR:-} ]]; then  # else the node's own TMPDIR; launch.py works in a private folder in it
    export TMPDIR=$CSSR_TMPDIR
  fi

  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  # A port free right now on this, the batch host = the first node (a fixed formula such as
  # 20000 + job id collides with whatever else listens there, and then node 0 fails at once
  # while the others wait for the rendezvous).
  export MASTER_PORT=${MASTER_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

  local launch=()
  if [[ -n ${LAUNCH_CONFIG:-} ]]; then
    launch+=(--config_file "$LAUNCH_CONFIG")
  fi
  if (( total > 1 )); then
    # --machine_rank comes from SLURM_NODEID, read by launchers/launch.py on each node
    launch+=(--multi_gpu --num_machines "$nnodes" --num_processes "$total"
             --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
             --rdzv_backend static --same_network)
  else
    launch+=(--num_machines 1 --num_processes 1)
    if [[ -n ${ACCELERATE_USE_CPU:-} && ${ACCELERATE_USE_CPU} != 0 ]]; then
      launch+=(--cpu)
    fi
  fi
  launch+=(--mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no)

  echo "cssr job ${SLURM_JOB_ID} restart ${restart}: ${nnodes} node(s) x ${per_node} process(es)," \
       "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run ${run_dir}, node logs ${log_dir}/node<N>.log"

  # Preemption: Slurm (--signal=USR1@T, a preemption's GraceTime SIGTERM, the time limit)
  # signals every process of the step itself; a signal sent to this batch shell only
  # (--signal=B:USR1@T, scancel --batch) is passed to srun, which forwards it to every
  # process of the step. SIGTERM is passed as USR1 (the workers treat both alike): srun
  # answers SIGTERM with "forcing job termination", a SIGKILL of every task, so a forwarded
  # TERM would kill the workers before their checkpoint (tests/test_slurm.py, measured).
  local srun_pid rc
  trap 'kill -USR1 "$srun_pid" 2>/dev/null || true' USR1 TERM
  # The step asks for the job's CPUs and GPUs explicitly: since Slurm 22.05 srun no longer
  # inherits --cpus-per-task, and with cgroup/affinity plugins a step gets only what it asks for.
  local step=(--nodes="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
  if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
    step+=(--gpus-per-node="$SLURM_GPUS_ON_NODE")
  fi
  srun "${step[@]}" --kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}" --output="$log_dir/node%n.log" \
       "$py" launchers/launch.py "${launch[@]}" train.py --config "$config" "run.name=$name" "$@" &
  srun_pid=$!
  while true; do
    rc=0
    wait "$srun_pid" || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # still running: a trapped signal interrupted `wait`
  done
  trap - USR1 TERM

  if (( rc == REQUEUE_EXIT_CODE )); then
    if (( restart < ${MAX_REQUEUES:-20} )); then
      echo "cssr job ${SLURM_JOB_ID}: preempted, checkpoint written; requeueing (restart $(( restart + 1 )))"
      # Slurm's own preemption (PreemptMode=REQUEUE) requeues the job itself and then refuses
      # this one: not an error, the job comes back either way
      scontrol requeue "$SLURM_JOB_ID" \
        || echo "cssr job ${SLURM_JOB_ID}: scontrol requeue refused (Slurm is requeueing the preempted job itself)"
    else
      echo "cssr job ${SLURM_JOB_ID}: preempted, but restarted ${restart} times already (MAX_REQUEUES); not requeueing"
    fi
  elif (( rc != 0 )); then
    echo "cssr job ${SLURM_JOB_ID}: failed with exit code ${rc}; see ${log_dir}/node*.log" >&2
  fi
  return "$rc"
}
