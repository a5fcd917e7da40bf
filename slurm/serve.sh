#!/bin/bash
# mpipar's OpenAI-compatible server as a Slurm job: 2 nodes x 8 GPUs, TP=4 x PP=4 by
# default (the layout of two_node.sh). World rank 0 serves HTTP on the first node; the
# job's output says where ("mpipar serve: rank 0 on host H listening on http://H:PORT").
#
#   MPIPAR_MODEL=/data/Qwen3-8B MPIPAR_API_KEY=... sbatch slurm/serve.sh
#   MPIPAR_TP=8 MPIPAR_PP=1 sbatch --nodes=1 slurm/serve.sh --max-num-seqs 128
#   curl -H "Authorization: Bearer $MPIPAR_API_KEY" http://H:8000/v1/models
#   scancel JOB            # SIGTERM: every rank ends (exit 0) within seconds
#
# Arguments after the script go to programs/serve.py. MPIPAR_HOST (default 0.0.0.0, so
# clients on other hosts reach rank 0's node; the server warns when that comes without
# an API key) and MPIPAR_PORT (default 8000; 0 = any free port) choose where it listens;
# MPIPAR_API_KEY, read by the server itself, sets the key. Every other variable
# (launcher, modules, venv, device, layout) is listed in slurm/mpipar_job.sh, the body
# this script shares with one_node.sh and two_node.sh. Submit from the repository root
# (or set MPIPAR_ROOT).
#
# Partition, account, QOS: SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS, the sbatch
# command line, or uncomment and edit:
##SBATCH --partition=gpu
##SBATCH --account=myproject
#SBATCH --job-name=mpipar-serve
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=mpipar-serve-%j.out

: "${MPIPAR_TP:=4}" "${MPIPAR_PP:=4}"   # the default layout; MPIPAR_DP, MPIPAR_EP: 1
: "${MPIPAR_HOST:=0.0.0.0}" "${MPIPAR_PORT:=8000}"
: "${MPIPAR_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$MPIPAR_ROOT/slurm/mpipar_job.sh" ] || { echo "mpipar: no slurm/mpipar_job.sh in" \
    "$MPIPAR_ROOT: run sbatch in the mpipar checkout or set MPIPAR_ROOT" >&2; exit 2; }
MPIPAR_PROGRAM="$MPIPAR_ROOT/programs/serve.py"
set -- --host "$MPIPAR_HOST" --port "$MPIPAR_PORT" "$@"
# shellcheck source=slurm/mpipar_job.sh
source "$MPIPAR_ROOT/slurm/mpipar_job.sh"
