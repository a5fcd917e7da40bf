#!/bin/bash
# mpipar on 2 nodes x 8 GPUs: 16 ranks, one GPU each, TP=4 x PP=4.
#
# Ranks are numbered TP-innermost (world = (pp*dp + dp_rank)*tp + tp_rank) and Slurm
# fills node 1 with ranks 0-7, node 2 with 8-15 (block distribution), so each TP group
# {0-3} {4-7} ... sits on one node (NVLink: its all-reduces after every attention and
# MLP block stay there) and only pipeline point-to-point traffic crosses the network
# (activations stage 1 -> 2, chosen token ids stage 3 -> 0).
#
#   node 1: stage 0 = ranks 0-3, stage 1 = ranks 4-7
#   node 2: stage 2 = ranks 8-11, stage 3 = ranks 12-15
#
# Submit from the repository root (the job finds slurm/mpipar_job.sh and programs/
# through $SLURM_SUBMIT_DIR, or set MPIPAR_ROOT); arguments after the script go to
# programs/transformer.py:
#   sbatch slurm/two_node.sh                                   # built-in small model
#   sbatch slurm/two_node.sh --model /data/Qwen3-8B --prefill-chunks 8
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=proj123 sbatch slurm/two_node.sh
#   MPIPAR_LAUNCHER=mpirun sbatch slurm/two_node.sh            # mpirun inside the job
#   MPIPAR_DEVICE=cpu sbatch --gpus-per-node=0 slurm/two_node.sh   # GPU-less nodes
# Variables set when submitting reach the job (sbatch exports the environment); they
# are listed in slurm/mpipar_job.sh, the body this script shares with slurm/one_node.sh.
#
# Partition, account, QOS: #SBATCH lines cannot read variables, so give them as
# SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS (they override the lines below) or on
# the sbatch command line (overrides both), or uncomment and edit:
##SBATCH --partition=gpu
##SBATCH --account=myproject
#SBATCH --job-name=mpipar-2x8
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=mpipar-2x8-%j.out

: "${MPIPAR_TP:=4}" "${MPIPAR_PP:=4}"   # the default layout; MPIPAR_DP, MPIPAR_EP: 1
# The rest is slurm/mpipar_job.sh in the checkout MPIPAR_ROOT (default: where sbatch ran;
# the job runs a copy of this file from Slurm's spool directory, away from the checkout).
: "${MPIPAR_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$MPIPAR_ROOT/slurm/mpipar_job.sh" ] || { echo "mpipar: no slurm/mpipar_job.sh in" \
    "$MPIPAR_ROOT: run sbatch in the mpipar checkout or set MPIPAR_ROOT" >&2; exit 2; }
# shellcheck source=slurm/mpipar_job.sh
source "$MPIPAR_ROOT/slurm/mpipar_job.sh"
