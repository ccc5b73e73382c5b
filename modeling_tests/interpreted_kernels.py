"""A pytest plugin that runs mamba-ssm's Triton kernels on the CPU, under Triton's interpreter.

    PYTHONPATH=modeling_tests python -m pytest -p interpreted_kernels modeling_tests/test_kernels_interpreted.py

With `TWOTOWER_KERNELS=cuda` (on a GPU, `benchmarks/gpu_check.sh`) the kernels run for real: no interpreter, no shims,
the same tests and call counts.

It must act before transformers is imported: transformers picks mamba-ssm's functions when its Nemotron-H module is
imported. Loaded with `-p`, a plugin runs before any conftest. Four shims make mamba-ssm importable and runnable
without CUDA; they live here, in the tests, never in the package:

1. `TRITON_INTERPRET=1` before `triton` is imported: kernels run on CPU tensors, with numpy;
2. `torch.cuda.device(...)` becomes a null context (mamba-ssm wraps its launches in it; CPU torch raises);
3. a stand-in `selective_scan_cuda` module (mamba-ssm's `__init__` imports that CUDA extension);
4. the autotuner's benchmark returns a constant (the interpreter has no benchmarker), so it keeps its first config.

One more setting only saves time: the interpreter's integer-overflow sanitiser, a debugging check that compiled
kernels do not run, is off (it took half of every chunk-scan call).

`CALLS` counts the calls of the mamba-ssm functions transformers uses, so a test can tell the kernel path was taken.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import os
import sys
import types
from collections import Counter


ON_GPU = os.environ.get("TWOTOWER_KERNELS") == "cuda"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TWOTOWER_INTERPRETED_KERNELS"] = "1"

CALLS: Counter = Counter()
AVAILABLE = all(importlib.util.find_spec(name) is not None for name in ("triton", "mamba_ssm", "einops"))
# The mamba-ssm functions transformers' Nemotron-H picks, by module.
COUNTED = {
    "mamba_ssm.ops.triton.ssd_combined": ("mamba_chunk_scan_combined",),
    "mamba_ssm.ops.triton.selective_state_update": ("selective_state_update",),
}


def _counted(name, function):
    @functools.wraps(function)  # keeps the signature transformers inspects
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return function(*args, **kwargs)

    return wrapper


def _install():
    if not ON_GPU:
        _install_interpreter_shims()
    for module_name, names in COUNTED.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, _counted(name, getattr(module, name)))


def _install_interpreter_shims():
    import torch
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    torch.cuda.device = lambda device: contextlib.nullcontext()
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: [1.0, 1.0, 1.0])
    interpreter.interpreter_builder.options = dataclasses.replace(
        interpreter.interpreter_builder.options, sanitize_overflow=False
    )


if AVAILABLE:
    _install()
