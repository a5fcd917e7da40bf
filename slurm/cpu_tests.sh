#!/bin/bash
# The mpipar test suite on a CPU node, at 1 rank and at 4 ranks (the way CI runs it):
#   sbatch slurm/cpu_tests.sh                        # whole suite
#   sbatch slurm/cpu_tests.sh tests/test_layout.py   # arguments go to pytest
#   MPIPAR_LAUNCHER=mpirun sbatch slurm/cpu_tests.sh
#
# Pass 1 runs pytest as one process in the batch shell, including the @launcher tests
# that start mpirun themselves (inside the allocation mpirun starts its ranks on this
# node). Pass 2 runs pytest as MPIPAR_RANKS MPI ranks, without the @launcher tests:
# they ran in pass 1, and an mpirun started from inside a running step would wait for
# CPUs the step already holds. Exit status: non-zero if either pass failed.
#
# Partition, account: SBATCH_PARTITION / SBATCH_ACCOUNT, the sbatch command line, or:
##SBATCH --partition=cpu
##SBATCH --account=myproject
#SBATCH --job-name=mpipar-tests
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=mpipar-tests-%j.out

set -euo pipefail

: "${MPIPAR_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"   # the mpipar checkout
: "${MPIPAR_RANKS:=${SLURM_NTASKS:-4}}"
: "${MPIPAR_SETUP:=}"               # shell code run first, e.g. "source /etc/profile.d/lmod.sh"
: "${MPIPAR_MODULES:=}"             # e.g. "openmpi/4.1.6" (module load)
: "${MPIPAR_VENV:=}"                # virtualenv with mpipar[test] installed
: "${MPIPAR_PYTHON:=python3}"
: "${MPIPAR_LAUNCHER:=srun}"        # srun | mpirun
: "${MPIPAR_SRUN_MPI:=pmix}"        # srun --mpi=: pmix, or pmi2
                                    # (the PyPI MPICH wheel speaks PMI-2, not PMIx)
: "${MPIPAR_MPIRUN:=mpirun}"

set +u  # site init scripts, module and activate often read unset variables
eval "$MPIPAR_SETUP"
# shellcheck disable=SC2086
[ -z "$MPIPAR_MODULES" ] || module load $MPIPAR_MODULES
# shellcheck disable=SC1091
[ -z "$MPIPAR_VENV" ] || source "$MPIPAR_VENV/bin/activate"
set -u
export MPIPAR_DEVICE=cpu PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$MPIPAR_ROOT"

echo "mpipar-tests: job ${SLURM_JOB_ID:-?} on $(hostname), $MPIPAR_RANKS ranks," \
     "launcher $MPIPAR_LAUNCHER, python $(command -v "$MPIPAR_PYTHON"), pytest args: $*"

status=0
echo "=== pass 1: 1 process (with launcher tests) ==="
"$MPIPAR_PYTHON" -m pytest -q "$@" || status=1

echo "=== pass 2: $MPIPAR_RANKS ranks ($MPIPAR_LAUNCHER) ==="
if [ "$MPIPAR_LAUNCHER" = srun ]; then
    srun --mpi="$MPIPAR_SRUN_MPI" --ntasks="$MPIPAR_RANKS" --kill-on-bad-exit=1 \
        "$MPIPAR_PYTHON" -m pytest -q -m "not launcher" "$@" || status=1
else
    "$MPIPAR_MPIRUN" -n "$MPIPAR_RANKS" \
        "$MPIPAR_PYTHON" -m pytest -q -m "not launcher" "$@" || status=1
fi
echo "mpipar-tests: $([ "$status" = 0 ] && echo passed || echo FAILED)"
exit "$status"
