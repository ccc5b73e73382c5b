#!/usr/bin/env bash
# One prepared GPU check (for a machine with CUDA and Triton): the kernel tests, the bf16 tests, the step costs at the
# real model's shape, and the demo benchmark in bf16. Wheels of mamba-ssm / causal-conv1d built elsewhere (see the
# README's note on MAMBA_SKIP_CUDA_BUILD) can be put in ./wheels; they are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q torch "transformers==5.23.*" accelerate safetensors pytest peft datasets matplotlib
if compgen -G "wheels/*.whl" > /dev/null; then pip install -q --no-deps wheels/*.whl; fi
pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total --format=csv
HF_HUB_OFFLINE=1 python -m pytest modeling_tests/test_gpu.py modeling_tests/test_mamba_scan.py -q -rs
python -m transformers_twotower bench --device cuda --synthetic
python -m transformers_twotower bench --device cuda --step-costs
python -m transformers_twotower bench --device cuda --repeats 3 --output benchmarks/results/demo_cuda.json
