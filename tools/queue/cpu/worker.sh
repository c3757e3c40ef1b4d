#!/usr/bin/env bash
# Runs the CPU queue's sweeps in order, pinned to one core and niced; start one worker per core:
#   nohup bash tools/queue/cpu/worker.sh 0 >> runs/worker_0.log 2>&1 &
#   nohup bash tools/queue/cpu/worker.sh 1 >> runs/worker_1.log 2>&1 &
# The workers share the runs through the sweep's lock files. Each run imports the trainer when it
# starts, so to edit the trainer while a queue runs, start the workers from a copy of the tree
# (git worktree) whose experiments/, runs/, .venv and .jax_cache link to this one's.
# PYTHON: the interpreter (default .venv/bin/python). COMMIT=1: each line's sweep commits its
# records and report once it has gone through its runs (sweep.py --commit): a commit a block.
set -u
core=${1:?usage: worker.sh CORE [QUEUE]}
root=$(cd "$(dirname "$0")/../../.." && pwd)
queue=$(realpath "${2:-$root/tools/queue/cpu/queue.txt}")
cd "$root"
grep -v -e '^#' -e '^[[:space:]]*$' "$queue" | while read -r flags; do
  [ "${COMMIT:-0}" = 1 ] && flags="$flags --commit"
  echo "$(date -u +%FT%TZ) core $core: sweep.py $flags"
  # shellcheck disable=SC2086  # the line's flags are split on spaces
  taskset -c "$core" nice -n 19 "${PYTHON:-.venv/bin/python}" sweep.py $flags < /dev/null
done
