#!/usr/bin/env bash
# On a lent GPU machine (device tool, carry=[".device"] made by prepare.py): sweeps, time-boxed,
# their finished runs packed into $OUT.
#
#   bash tools/queue/device/run.sh QUEUE_FILE      # one sweep.py argument list per line, in order
#   bash tools/queue/device/run.sh SWEEP_ARGS...   # a single sweep
#
# WORKERS (default 1) sweep processes share the GPU; each works through the lines in order, and a
# run goes to whichever takes its lock first (sweep.py), so a line's leftover runs are shared out
# and idle workers move on. BUDGET_S (default 480) stops them in time to pack; runs finished by
# then are in the archive, unfinished ones are lost with the machine.
set -uo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Several JAX processes on one GPU: each takes a share of its memory instead of 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.05}
"$PY" -c "import ml_collections, datasets, tensorboardX" 2>/dev/null \
  || "$PY" -m pip install --quiet --no-index --no-deps .device/wheels/*.whl
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
"$PY" tools/queue/device/cast_model.py .device/minilm /tmp/minilm

if [ $# -eq 1 ] && [ -f "$1" ]; then
  mapfile -t lines < <(grep -v '^\s*\(#\|$\)' "$1")
else
  lines=("$*")
fi

# The model joins each line's --set (it names the runs: GPU runs never mix with the CPU ones).
sweep_args() {
  local a model_set="" out=()
  for a in $1; do
    case "$a" in --set=*) out+=("$a,model=/tmp/minilm"); model_set=1 ;; *) out+=("$a") ;; esac
  done
  [ -n "$model_set" ] || out+=("--set=model=/tmp/minilm")
  echo "${out[@]}" --data_dir=.device/glue --nli_dir=.device/nli
}

worker() {
  local line
  for line in "${lines[@]}"; do
    echo "=== $(date +%T) $line"
    # shellcheck disable=SC2046
    "$PY" sweep.py $(sweep_args "$line")
    echo "=== $(date +%T) exit status $?"
  done
}

mkdir -p "$OUT" runs
# Runs finished or failed so far, over every worker's log.
count() { cat runs/device_worker_*.log | grep -c "  $1"; }

start=$SECONDS
pids=()
for w in $(seq "${WORKERS:-1}"); do
  setsid bash -c "$(declare -f sweep_args worker); PY='$PY'; lines=($(printf '%q ' "${lines[@]}")); worker" \
    > "runs/device_worker_$w.log" 2>&1 &
  pids+=($!)
  sleep 2
done
while [ $((SECONDS - start)) -lt "${BUDGET_S:-480}" ]; do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 1 ] || break
  # Stop early (and keep the machine's time) when runs only fail.
  failed=$(count "failed:")
  if [ "$(count "done in")" = 0 ] && [ "$failed" -ge "${WORKERS:-1}" ]; then
    echo "the first $failed runs failed: stopping"
    break
  fi
  sleep 5
done
for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
sleep 3
echo "workers stopped after $((SECONDS - start)) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
du -sh .jax_cache 2>/dev/null  # the compilation cache: could a later call carry it?
echo "runs finished: $(count "done in"), failed: $(count "failed:")"
# Logs of the runs without a result (failed or stopped): the last lines of each, progress bars out.
for d in runs/sweep/*/; do
  [ -f "$d/results.json" ] || { echo "--- $d"; tr '\r' '\n' < "$d/log.txt" | grep -v "it/s\]\|s/it\]\|examples/s\]" | tail -5; }
done > runs/device_unfinished.txt 2>/dev/null
tar czf "$OUT/experiments.tgz" experiments/*.jsonl experiments/*/protocol.json runs/device_*
ls -la "$OUT"
