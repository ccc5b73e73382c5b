#!/usr/bin/env bash
# The prepared GPU check: one run of under 10 minutes on a machine with CUDA, PyTorch and Triton (the lent device's
# python3 holds them; nothing can be downloaded there). Prepare on a CPU machine first, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude && mkdir -p .whl
#   MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip wheel --no-deps --no-build-isolation mamba-ssm==2.3.2.post1 -w .whl
#   pip download --no-deps -d .whl "transformers==5.23.*" "huggingface_hub==2.4.*" einops
#   (a causal-conv1d wheel built for the device's torch and CUDA, if one is at hand: it is then tested too)
#
# then run `bash benchmarks/gpu_check.sh` there with `.whl` carried. It runs:
#   1. the interpreted-kernel suite's cases with the real CUDA/Triton kernels (no interpreter), call counts included;
#   2. modeling_tests/test_gpu.py: kernels against the naive recurrence, the release fixture on the GPU, bf16;
#   3. the step costs at the real model's shape (bf16, random weights) and on the demo, eager and compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
TWOTOWER_KERNELS=cuda PYTHONPATH="modeling_tests:$PYTHONPATH" \
  python3 -m pytest -p interpreted_kernels modeling_tests/test_kernels_interpreted.py -q -rs -p no:cacheprovider
python3 -m pytest modeling_tests/test_gpu.py -q -rs -p no:cacheprovider
python3 -m transformers_twotower bench --device cuda --synthetic
python3 -m transformers_twotower bench --device cuda --step-costs --compile --label gpu
