#!/usr/bin/env bash
# The prepared GPU check: one device call of at most 8 minutes, from a bare machine with cold Triton caches.
#
# Prepare on a CPU machine, in the repository root (the wheels for the device's Python 3.12; nothing can be
# downloaded there):
#
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   (cd .whl && MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
#       pip wheel --no-deps --no-build-isolation mamba-ssm==2.3.2.post1 -w .)
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl "transformers==5.23.*" regex einops \
#       "huggingface_hub==2.4.*" "tokenizers==0.23.*" "safetensors==0.8.*"
#
# then, with `.whl` carried: `OUT=/some/dir bash benchmarks/gpu_check.sh`. Each part runs under its own time limit
# and writes its log to $OUT/logs/<part>.log; the step costs go to benchmarks/results/step_costs_cuda.json (copied
# to $OUT). It ends with a table of the parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT/logs"
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl > "$OUT/logs/install.log" 2>&1
# mamba-ssm's __init__ imports its Mamba-1 CUDA extension, which the pure-Python wheel lacks. The project only uses
# its Triton kernels: a stand-in module that fails if anything calls it lets the package import.
cat > "$SITE/selective_scan_cuda.py" <<'PY'
def __getattr__(name):
    raise RuntimeError(f"selective_scan_cuda.{name}: the Mamba-1 CUDA extension is not built here (a stand-in)")
PY
export PYTHONPATH="$SITE:$PWD/src:$PWD/modeling_tests" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
declare -a PARTS
part() {  # part NAME SECONDS COMMAND...: run under a time limit, log to $OUT/logs/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local outcome="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && outcome="TIMEOUT (${limit}s)"
  [ $rc -ne 0 ] && [ "$outcome" = "ok" ] && outcome="FAILED (rc $rc)"
  PARTS+=("$(printf '%-22s %-18s %4ss  %s' "$name" "$outcome" $((SECONDS - began)) "$(grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/logs/$name.log" | tail -1 | cut -c1-90)")")
}

part environment 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && python3 -c "
import torch, transformers, triton, mamba_ssm
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"triton\", triton.__version__, \"mamba_ssm\", mamba_ssm.__version__)"'
# 1. Step costs at the release's widths (26 layers, 128 experts, bf16): eager and one CUDA graph per step.
part steps_eager_graph 170 python3 benchmarks/bench_steps.py --device cuda --batch-sizes 1 8 32 \
  --variants eager cuda_graph --label synthetic_real_26_layers
# 2. The GPU tests: the release fixture (fp32, and bf16), compile=True's CUDA defaults against eager.
part test_gpu 150 python3 -m pytest modeling_tests/test_gpu.py -q -rA --tb=short -p no:cacheprovider
# 3. The compiled steps (inductor, fullgraph, reduce-overhead) at batch 1.
part steps_compiled 150 python3 benchmarks/bench_steps.py --device cuda --batch-sizes 1 --variants compiled \
  --repeats 5 --label synthetic_real_26_layers_compiled
# 4. The kernel suite with the real kernels, fp32 dots in IEEE precision (Triton's default is TF32).
part kernels_ieee 90 env TWOTOWER_KERNELS=cuda TRITON_F32_DEFAULT=ieee \
  python3 -m pytest -p interpreted_kernels modeling_tests/test_kernels_interpreted.py -q -rA --tb=short -p no:cacheprovider

cp benchmarks/results/step_costs_cuda.json "$OUT/" 2>/dev/null
grep -h -A 40 "^synthetic" "$OUT/logs/steps_eager_graph.log" "$OUT/logs/steps_compiled.log" > "$OUT/steps_table.txt" 2>/dev/null
echo
cat "$OUT/steps_table.txt"
echo
printf '%-22s %-18s %5s  %s\n' part outcome time "last line"
printf '%s\n' "${PARTS[@]}" | tee "$OUT/summary.txt"
