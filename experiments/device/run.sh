#!/usr/bin/env bash
# On a lent GPU machine (device tool, carry=[".device"] made by prepare.py): one sweep.py command,
# time-boxed, its results packed into $OUT. Arguments go to sweep.py; BUDGET_S (default 480) stops
# the sweep in time to pack (an unfinished run resumes from its checkpoint in a later call only if
# the machine is still warm; its finished runs are in the archive either way).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import ml_collections, datasets, tensorboardX" 2>/dev/null \
  || "$PY" -m pip install --quiet --no-index --no-deps .device/wheels/*.whl
"$PY" -c "import jax; print('devices:', jax.devices())"
"$PY" experiments/device/cast_model.py .device/minilm /tmp/minilm
# The model joins the command's --set (it names the runs: GPU runs never mix with the CPU ones).
args=() model_set=""
for a in "$@"; do
  case "$a" in --set=*) args+=("$a,model=/tmp/minilm"); model_set=1 ;; *) args+=("$a") ;; esac
done
[ -n "$model_set" ] || args+=("--set=model=/tmp/minilm")
timeout "${BUDGET_S:-480}" "$PY" sweep.py "${args[@]}" --data_dir=.device/glue --nli_dir=.device/nli
echo "sweep exit status $?"
mkdir -p "${OUT:-/tmp/out}"
tar czf "${OUT:-/tmp/out}/experiments.tgz" experiments/runs experiments/*/report.md \
  experiments/*/summary.json experiments/*/protocol.json
ls -la "${OUT:-/tmp/out}"
