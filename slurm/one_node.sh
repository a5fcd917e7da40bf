#!/bin/bash
# mpipar on 1 node x 8 GPUs: 8 ranks, one GPU each. Default TP=4 x PP=2; or TP=8:
#   sbatch slurm/one_node.sh                                   # TP=4 PP=2, built-in model
#   MPIPAR_TP=8 MPIPAR_PP=1 sbatch slurm/one_node.sh --model /data/Qwen3-30B-A3B
#   MPIPAR_TP=2 MPIPAR_DP=2 MPIPAR_PP=2 MPIPAR_EP=4 sbatch slurm/one_node.sh --model ...
#
# Every rank is on one NVLink domain, so any split works; what differs is the work:
# - TP=8: each all-reduce spans 8 GPUs; with fewer KV heads than 8 (Qwen3-30B-A3B has 4)
#   each KV head is replicated on tp/kv_heads ranks: the KV cache and its projections are
#   computed twice, and the attention stops scaling past TP = kv heads.
# - TP=4 x PP=2: TP <= kv heads (no replication), half the layers per stage, the pipeline
#   fills with --prefill-chunks K (bubble ~ (pp-1)/(K+pp-1) of prefill).
# The rank layout is TP-innermost (world = (pp*dp + dp_rank)*tp + tp_rank).
#
# Submit from the repository root (the job finds slurm/mpipar_job.sh and programs/
# through $SLURM_SUBMIT_DIR, or set MPIPAR_ROOT); arguments after the script go to
# programs/transformer.py. The variables are listed in slurm/mpipar_job.sh, the body
# this script shares with slurm/two_node.sh:
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=proj123 sbatch slurm/one_node.sh
#   MPIPAR_LAUNCHER=mpirun sbatch slurm/one_node.sh
#   MPIPAR_DEVICE=cpu sbatch --gpus-per-node=0 slurm/one_node.sh   # a GPU-less node
#
# Partition, account, QOS: #SBATCH lines cannot read variables, so give them as
# SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS (they override the lines below) or on
# the sbatch command line (overrides both), or uncomment and edit:
##SBATCH --partition=gpu
##SBATCH --account=myproject
#SBATCH --job-name=mpipar-1x8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=mpipar-1x8-%j.out

: "${MPIPAR_TP:=4}" "${MPIPAR_PP:=2}"   # the default layout; MPIPAR_DP, MPIPAR_EP: 1
# The rest is slurm/mpipar_job.sh in the checkout MPIPAR_ROOT (default: where sbatch ran;
# the job runs a copy of this file from Slurm's spool directory, away from the checkout).
: "${MPIPAR_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$MPIPAR_ROOT/slurm/mpipar_job.sh" ] || { echo "mpipar: no slurm/mpipar_job.sh in" \
    "$MPIPAR_ROOT: run sbatch in the mpipar checkout or set MPIPAR_ROOT" >&2; exit 2; }
# shellcheck source=slurm/mpipar_job.sh
source "$MPIPAR_ROOT/slurm/mpipar_job.sh"
