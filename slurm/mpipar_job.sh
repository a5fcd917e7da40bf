# shellcheck shell=bash
# The body of slurm/one_node.sh and slurm/two_node.sh, sourced by them (not a batch script
# itself). They hold the #SBATCH allocation and set the default layout (MPIPAR_TP,
# MPIPAR_PP) and MPIPAR_ROOT (the mpipar checkout: by default the directory sbatch ran
# in, since the job runs a spool copy of the batch script). This file sets the shell
# options and every other variable, checks that tp*pp*dp equals the job's task count,
# sets up CUDA-aware MPI, and launches one rank per task through a wrapper that binds its
# GPU: programs/transformer.py with the batch script's arguments ("$@").
#
# Every variable below can be set in the environment of sbatch (sbatch exports it into
# the job), e.g.
#   MPIPAR_MODULES="cuda/12.4 openmpi/4.1.6" MPIPAR_VENV=~/venvs/mpipar \
#       sbatch slurm/two_node.sh
#   MPIPAR_LAUNCHER=mpirun sbatch slurm/two_node.sh            # mpirun inside the job
#   MPIPAR_DEVICE=cpu sbatch --gpus-per-node=0 slurm/two_node.sh   # GPU-less nodes

set -euo pipefail

# ---- site settings: every one can be set in the environment of sbatch -----------------
: "${MPIPAR_TP:?set by the batch script}" "${MPIPAR_PP:?set by the batch script}"
: "${MPIPAR_DP:=1}" "${MPIPAR_EP:=1}"
: "${MPIPAR_DEVICE:=gpu}"           # gpu | cpu (cpu: same job on GPU-less nodes)
: "${MPIPAR_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"   # the mpipar checkout
: "${MPIPAR_PROGRAM:=$MPIPAR_ROOT/programs/transformer.py}"
: "${MPIPAR_MODEL:=}"               # Hugging Face folder; empty = built-in model
: "${MPIPAR_SETUP:=}"               # shell code run first, e.g. "source /etc/profile.d/lmod.sh"
: "${MPIPAR_MODULES:=}"             # e.g. "cuda/12.4 openmpi/4.1.6" (module load)
: "${MPIPAR_VENV:=}"                # virtualenv to activate (mpi4py built on this MPI)
: "${MPIPAR_PYTHON:=python3}"       # or a conda env's python, by path
: "${MPIPAR_LAUNCHER:=srun}"        # srun | mpirun
: "${MPIPAR_SRUN_MPI:=pmix}"        # srun --mpi=: pmix (Open MPI 4/5, recent MPICH), pmi2
: "${MPIPAR_SRUN_ARGS:=}"           # more srun flags
: "${MPIPAR_MPIRUN:=mpirun}"        # the MPI's own launcher (uses the allocation)
: "${MPIPAR_MPIRUN_ARGS:=}"         # e.g. "--map-by ppr:8:node --bind-to none" (Open MPI)
: "${MPIPAR_GPU_BIND:=visible}"     # visible: CUDA_VISIBLE_DEVICES=<local rank's GPU>
                                    # none: all GPUs visible; the program takes
                                    # local_rank % n_gpus itself (mpipar/backend.py)

set +u  # site init scripts, module and activate often read unset variables
eval "$MPIPAR_SETUP"
# shellcheck disable=SC2086
[ -z "$MPIPAR_MODULES" ] || module load $MPIPAR_MODULES
# shellcheck disable=SC1091
[ -z "$MPIPAR_VENV" ] || source "$MPIPAR_VENV/bin/activate"
set -u
export MPIPAR_DEVICE MPIPAR_LAUNCHER MPIPAR_GPU_BIND
# One BLAS thread per rank (raise it for CPU runs with spare cores per task).
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ "$MPIPAR_DEVICE" = gpu ]; then
    # CUDA-aware MPI: GPU buffers go to MPI directly (NVLink via cuda_ipc inside a node,
    # GPUDirect RDMA over InfiniBand across nodes). Open MPI + UCX:
    export OMPI_MCA_pml="${OMPI_MCA_pml:-ucx}"
    # Add gdr_copy if GDRCopy is installed; tcp instead of rc without InfiniBand/RoCE.
    export UCX_TLS="${UCX_TLS:-rc,sm,self,cuda_copy,cuda_ipc}"
    # Cray MPICH instead: export MPICH_GPU_SUPPORT_ENABLED=1.
    # Check that the MPI is CUDA-aware (else mpipar stages through host memory and says so):
    #   ompi_info --parsable --all | grep mpi_built_with_cuda_support:value   -> true
    #   ucx_info -d | grep -E 'cuda_(copy|ipc)'                             -> listed
    #   python -c 'import mpi4py.MPI; from mpipar.backend import cuda_aware; print(cuda_aware())'
fi

ranks=$((MPIPAR_TP * MPIPAR_PP * MPIPAR_DP))
if [ "$ranks" -ne "${SLURM_NTASKS:-0}" ]; then
    echo "mpipar: tp*pp*dp = $MPIPAR_TP*$MPIPAR_PP*$MPIPAR_DP = $ranks ranks," \
         "but the job has ${SLURM_NTASKS:-no} tasks" >&2
    exit 2
fi
args=(--tp "$MPIPAR_TP" --pp "$MPIPAR_PP" --dp "$MPIPAR_DP" --ep "$MPIPAR_EP"
      --device "$MPIPAR_DEVICE")
[ -z "$MPIPAR_MODEL" ] || args+=(--model "$MPIPAR_MODEL")
args+=("$@")

# Runs once per rank on its node before Python: binds the rank's GPU and prints where the
# rank landed ("mpipar-task: rank R node N ..."; tests check TP groups stay on a node).
# shellcheck disable=SC2016
task='
if [ "$MPIPAR_LAUNCHER" = srun ]; then
    rank=$SLURM_PROCID lrank=$SLURM_LOCALID node=$SLURMD_NODENAME
else  # Open MPI, MPICH (Hydra), PMIx launchers
    rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-?}}}
    lrank=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PALS_LOCAL_RANKID:-0}}}
    node=$(hostname -s)
fi
gpu=${CUDA_VISIBLE_DEVICES:-all}
if [ "$MPIPAR_DEVICE" != gpu ]; then
    gpu="- (cpu)"
elif [ "$MPIPAR_GPU_BIND" = visible ]; then
    IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"  # the GPUs Slurm gave the job
    if [ ${#gpus[@]} -gt 0 ]; then  # more ranks than GPUs: they share, round-robin
        export CUDA_VISIBLE_DEVICES=${gpus[lrank % ${#gpus[@]}]}
    else
        export CUDA_VISIBLE_DEVICES=$lrank
    fi
    gpu=$CUDA_VISIBLE_DEVICES
fi
echo "mpipar-task: rank $rank node $node host $(hostname) local_rank $lrank gpu $gpu"
exec "$@"'

echo "mpipar: job ${SLURM_JOB_ID:-?} on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
     "$SLURM_NTASKS tasks (${SLURM_TASKS_PER_NODE:-?} per node), device $MPIPAR_DEVICE"
echo "mpipar: tp=$MPIPAR_TP pp=$MPIPAR_PP dp=$MPIPAR_DP ep=$MPIPAR_EP, launcher" \
     "$MPIPAR_LAUNCHER$([ "$MPIPAR_LAUNCHER" = srun ] && echo " --mpi=$MPIPAR_SRUN_MPI")," \
     "python $(command -v "$MPIPAR_PYTHON")"
echo "mpipar: $MPIPAR_PROGRAM ${args[*]}"

case "$MPIPAR_LAUNCHER" in
srun)
    # --cpus-per-task again: srun (22.05+) does not take it from the allocation.
    # shellcheck disable=SC2086
    srun --mpi="$MPIPAR_SRUN_MPI" --ntasks="$ranks" --distribution=block \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 $MPIPAR_SRUN_ARGS \
        bash -c "$task" mpipar-task "$MPIPAR_PYTHON" "$MPIPAR_PROGRAM" "${args[@]}"
    ;;
mpirun)
    # shellcheck disable=SC2086
    "$MPIPAR_MPIRUN" -n "$ranks" $MPIPAR_MPIRUN_ARGS \
        bash -c "$task" mpipar-task "$MPIPAR_PYTHON" "$MPIPAR_PROGRAM" "${args[@]}"
    ;;
*)
    echo "mpipar: MPIPAR_LAUNCHER must be srun or mpirun, got '$MPIPAR_LAUNCHER'" >&2
    exit 2
    ;;
esac
