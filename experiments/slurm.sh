#!/bin/bash
# A SLURM job array for `fortress experiment`: every array task runs one shard of a spec's cells, all of
# them into one folder on a file system that every node mounts and whose file locks work (NFS v4, Lustre
# with flock, a local disk for one machine). Task i of N runs `--shard i/N`: number the tasks from 1.
#   sbatch --array=1-8 experiments/slurm.sh experiments/paper.toml runs/paper
#   fortress report runs/paper                 # any time: the report of the cells so far, and the missing ones
# Submit the same array again to run what is missing (finished cells are skipped, a cell is never run twice
# at once). Extra arguments go to `fortress experiment`, e.g. --dry-run to list a shard's cells.
# Environment: FORTRESS (the command, default .venv/bin/fortress), BUDGET (start no cell after this long,
# default 11h: leave the longest cell time to finish before --time), FORTRESS_DATA (the datasets).
#SBATCH --job-name=fortress
#SBATCH --cpus-per-task=2
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
SPEC=${1:?usage: sbatch --array=1-N experiments/slurm.sh SPEC.toml OUT_DIR [fortress experiment options]}
OUT=${2:?usage: sbatch --array=1-N experiments/slurm.sh SPEC.toml OUT_DIR [fortress experiment options]}
shift 2
read -r -a FORTRESS <<< "${FORTRESS:-.venv/bin/fortress}"
# one cell per CPU, each on one torch thread (set threads = 1 in the spec's [set])
exec "${FORTRESS[@]}" experiment "$SPEC" --out "$OUT" --jobs "${SLURM_CPUS_PER_TASK:-1}" \
  --shard "${SLURM_ARRAY_TASK_ID:?not in a job array}/${SLURM_ARRAY_TASK_COUNT:?not in a job array}" \
  --budget "${BUDGET:-11h}" --quiet "$@"
