#!/usr/bin/env bash
# The GPU check: exactness, compile and step costs on one CUDA GPU, from cold Triton caches, in at most 8 minutes
# (its parts share a deadline of 450 s).
#
# Setup on the GPU machine (Python 3.12, PyTorch with CUDA already installed; the recorded figures used torch 2.11):
#
#   pip install "transformers==5.23.*" regex einops "huggingface_hub==2.4.*" "tokenizers==0.23.*" \
#       "safetensors==0.8.*" pytest
#   MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-deps --no-build-isolation mamba-ssm==2.3.2.post1
#
# The second line builds mamba-ssm without its CUDA extensions: the project uses only its Triton kernels (a full
# build of mamba-ssm works too). causal-conv1d is optional; the recorded figures ran without it. The package itself
# need not be installed: the check puts src/ on the path.
#
# A GPU machine without network access: build the same wheels on a machine with it, into .whl/ of the checkout, and
# copy the checkout (with .whl/) to the GPU machine; the check then installs them into /tmp/site first:
#
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   (cd .whl && MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
#       pip wheel --no-deps --no-build-isolation mamba-ssm==2.3.2.post1 -w .)
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl "transformers==5.23.*" regex einops \
#       "huggingface_hub==2.4.*" "tokenizers==0.23.*" "safetensors==0.8.*"
#
# Then, in the repository root: `OUT=/some/dir bash benchmarks/gpu_check.sh`. Each part runs under its own time limit
# and writes its log to $OUT/logs/<part>.log; the step costs go to benchmarks/results/step_costs_cuda.json (copied
# to $OUT). It ends with a table of the parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT/logs"
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl > "$OUT/logs/install.log" 2>&1
fi
# mamba-ssm's __init__ imports its Mamba-1 CUDA extension, which a build without CUDA extensions lacks. The project
# only uses its Triton kernels: where the extension is missing, a stand-in module that fails if anything calls it
# lets the package import.
if ! PYTHONPATH="$SITE" python3 -c "import selective_scan_cuda" 2> /dev/null; then
  cat > "$SITE/selective_scan_cuda.py" <<'PY'
def __getattr__(name):
    raise RuntimeError(f"selective_scan_cuda.{name}: the Mamba-1 CUDA extension is not built here (a stand-in)")
PY
fi
export PYTHONPATH="$SITE:$PWD/src:$PWD/modeling_tests" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
declare -a PARTS
DEADLINE=$((SECONDS + 450))  # the whole check within 8 minutes, with time to copy the results
part() {  # part NAME SECONDS COMMAND...: run under a time limit (cut to what the deadline leaves), log to
          # $OUT/logs/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local began=$SECONDS left=$((DEADLINE - SECONDS))
  if [ $left -lt 20 ]; then PARTS+=("$(printf '%-22s %-18s' "$name" "SKIPPED (no time)")"); return; fi
  [ $left -lt "$limit" ] && limit=$left
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local outcome="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && outcome="TIMEOUT (${limit}s)"
  [ $rc -ne 0 ] && [ "$outcome" = "ok" ] && outcome="FAILED (rc $rc)"
  PARTS+=("$(printf '%-22s %-18s %4ss  %s' "$name" "$outcome" $((SECONDS - began)) "$(grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/logs/$name.log" | tail -1 | cut -c1-90)")")
}
# fp32 checks compile the kernels with IEEE fp32 dots, into a Triton cache of their own (a kernel compiled in TF32
# by a bf16 part must not be reused by them).
IEEE=(env TRITON_F32_DEFAULT=ieee TRITON_CACHE_DIR=/tmp/triton-ieee)
PYTEST=(python3 -m pytest -q -rA --tb=short -p no:cacheprovider)

part environment 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && python3 -c "
import torch, transformers, triton, mamba_ssm
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"triton\", triton.__version__, \"mamba_ssm\", mamba_ssm.__version__)"'
# 1. Exactness: the release fixture in fp32 (logits and every recorded generation), bf16 against fp32 within the
#    rounding bound (test_bf16.py on CUDA), the kernel handed initial_states directly (a characterisation) and the
#    kernel suite's release logits.
part fixture_fp32 90 "${IEEE[@]}" "${PYTEST[@]}" modeling_tests/test_gpu.py -k "release_fixture or seeded_scan"
part bf16 60 "${PYTEST[@]}" modeling_tests/test_bf16.py -k cuda
part kernels_ieee 70 "${IEEE[@]}" TWOTOWER_KERNELS=cuda "${PYTEST[@]}" -p interpreted_kernels \
  modeling_tests/test_kernels_interpreted.py -k "seeded_scan or initial_states or logits_match_the_release"
# 2. generate(compile=True) with its CUDA defaults gives the eager tokens (the fixture in bf16, the default experts;
#    inductor, reduce-overhead).
part compiled_generate 100 "${PYTEST[@]}" modeling_tests/test_gpu.py -k compiled
# 3. Step costs at the release's widths, bf16, 26 layers, batch 1 and 8: each step eager, as one CUDA graph and
#    compiled (inductor, fullgraph, reduce-overhead; one block of each kind compiled, then reused), then whole
#    generate calls: AR against mask diffusion at a forced 2, 3 and 5 tokens per forward.
part steps_26_layers 200 python3 benchmarks/bench_steps.py --device cuda --layers 26 --batch-sizes 1 8 \
  --variants eager cuda_graph compiled --repeats 5 --generate --new-tokens 64 --label synthetic_real_26_layers

cp benchmarks/results/step_costs_cuda.json "$OUT/" 2>/dev/null
grep -h -A 60 "^synthetic" "$OUT/logs/steps_26_layers.log" > "$OUT/steps_table.txt" 2>/dev/null
echo
cat "$OUT/steps_table.txt"
echo
printf '%-22s %-18s %5s  %s\n' part outcome time "last line"
printf '%s\n' "${PARTS[@]}" | tee "$OUT/summary.txt"
