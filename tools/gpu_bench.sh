#!/usr/bin/env bash
# The GPU step benchmark of issue 29 in one command, from the repository root (nothing installed):
#   tools/gpu_bench.sh [OUT_DIR] [extra benchmarks.gpu_step flags]
# OUT_DIR defaults to $OUT (the device machine's returned folder) or benchmarks/results/gpu_step.
# The benchmark keeps its own time box (--budget-s, 420 s by default); `timeout` stops it at 470 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_step}}"
shift || true
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = ["jax", "flax", "optax", "transformers", "torch", "numpy", "ml_collections", "datasets"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_bench: missing Python packages: $missing" >&2
  exit 2
fi
"$PYTHON" -c "import jax; print('gpu_bench:', jax.default_backend(), jax.devices())"
exec timeout 470 "$PYTHON" -m benchmarks.gpu_step --out "$OUT_DIR" "$@"
