"""Training cost: a TwoTower training step against an AR training step of the same backbone, at growing lengths.

    python benchmarks/bench_training.py [--model DIR] [--lengths 256 1024 4096 8192] [--tokens 4096] [--repeats 3]
                                        [--compile]
    python benchmarks/bench_training.py --synthetic [--layers 4] [--scale real] --device cuda [--lengths 4096] ...

For each length, one batch of `--tokens` tokens (batch = tokens / length, at least 1): the TwoTower step is
`model(input_ids, labels=input_ids).loss.backward()` (the frozen context tower without gradient, the denoiser with);
the AR step is the same on transformers' `NemotronHForCausalLM` holding the context tower (the backbone trained
autoregressively). The two are alternated, median of `--repeats`. On the CPU step time is process CPU time on 1
thread, and peak memory is how far one step lifts the peak resident set above what was resident before it, in a fresh
process for each (Linux: the peak is reset through /proc/self/clear_refs). On CUDA, time is measured between
synchronisations, and peak memory is the allocator's peak during one step above what was allocated before it.

The model: `--model DIR` (default: the bundled demo, fp32), or `--synthetic`: random weights at the release's widths
(`--scale real`; `small` for a quick check), the first `--layers` of its 52-layer pattern, in `--dtype` (default bf16
on CUDA, fp32 on the CPU). With `--compile`, both steps are also timed under `torch.compile` (`--compile-backend`,
default inductor, static shapes; its first call at each length, which compiles, is not timed); peak memory is measured for the eager steps only.

Writes `--output` (default `benchmarks/results/training_{cpu|cuda}[_synthetic].json`): a list of rows
`{seq_len, batch_size, twotower_seconds, ar_seconds, ratio, twotower_peak_mb, ar_peak_mb}`, with `--compile`
also `{twotower_compiled_seconds, ar_compiled_seconds, ratio_compiled}`.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_compile import cpu_seconds


ROOT = Path(__file__).resolve().parents[1]


def load_models(folder: str, dtype=torch.float32, device="cpu"):
    """The TwoTower in `folder` and transformers' Nemotron-H holding its context tower, in train mode."""
    from transformers_twotower import TwoTowerForDiffusionLM
    from transformers_twotower.layout_twotower import context_tower_as_nemotron_h

    twotower = TwoTowerForDiffusionLM.from_pretrained(folder, dtype=dtype).to(device).train()
    return twotower, context_tower_as_nemotron_h(twotower)


def synthetic_models(layers: int, scale: str, dtype, device):
    """Random weights at the release's widths (`bench_steps.synthetic_model`), and the Nemotron-H of its context tower."""
    from bench_steps import synthetic_model

    from transformers_twotower.layout_twotower import context_tower_as_nemotron_h

    twotower = synthetic_model(layers, 128 if scale == "real" else 8, scale, device, dtype).train()
    return twotower, context_tower_as_nemotron_h(twotower)


def models(args):
    dtype = getattr(torch, args.dtype)
    if args.synthetic:
        return synthetic_models(args.layers, args.scale, dtype, args.device)
    return load_models(args.model, dtype, args.device)


def step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def batch(vocab: int, length: int, tokens: int, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(4, vocab, (max(1, tokens // length), length), generator=generator).to(device)


def seconds(fn, device: str) -> float:
    """Process CPU time on the CPU; on CUDA, the time between synchronisations."""
    if not device.startswith("cuda"):
        return cpu_seconds(fn)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_kb(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, from /proc (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mb(model, ids, argv: list[str], which: str) -> float:
    """One step's peak memory above what was there before it: on CUDA the allocator's, here; on the CPU the resident
    set's, in a fresh process (this script with `--peak`, building the same models from `argv`)."""
    if ids.device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, ids)
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    command = [sys.executable, __file__, *argv, "--peak", which, str(ids.shape[1])]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return round(float(result.stdout.strip().splitlines()[-1]), 1)


def measure_peak(args, which: str, length: int) -> float:
    twotower, ar = models(args)
    model = twotower if which == "twotower" else ar
    ids = batch(twotower.config.vocab_size, length, args.tokens, args.device)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
    before = memory_kb("VmRSS")
    step(model, ids)
    return (memory_kb("VmHWM") - before) / 1024


def median_pair(steps: dict, ids, repeats: int, device: str) -> dict:
    """Each step's median time, the steps alternated (after one warm-up call each)."""
    for run in steps.values():
        run(ids)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            times[name].append(seconds(lambda: run(ids), device))  # noqa: B023 (called at once)
    return {name: statistics.median(values) for name, values in times.items()}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src/transformers_twotower/demo"))
    parser.add_argument("--synthetic", action="store_true", help="random weights at the release's widths")
    parser.add_argument("--layers", type=int, default=4, help="with --synthetic: the first N of the 52 layers")
    parser.add_argument("--scale", choices=["real", "small"], default="real", help="with --synthetic")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time both steps under torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--output", help="default: benchmarks/results/training_{cpu|cuda}[_synthetic].json")
    parser.add_argument("--peak", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.output is None:
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
        args.output = str(ROOT / f"benchmarks/results/training_{kind}{'_synthetic' if args.synthetic else ''}.json")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(1)
    if args.peak:
        print(measure_peak(args, args.peak[0], int(args.peak[1])))
        return 0
    model_argv = [a for a in argv if a != "--compile"]  # what a fresh process needs to build the same models
    twotower, ar = models(args)
    steps = {"twotower": lambda ids: step(twotower, ids), "ar": lambda ids: step(ar, ids)}
    if args.compile:
        # Static shapes, each length compiled on its own, as training at one length is. Under automatic dynamic
        # shapes, inductor failed at the second length here ("cannot determine truth value of Relational"), with both
        # models compiled in this process; neither failed alone (torch 2.13).
        compiled = {name: torch.compile(model, backend=args.compile_backend, dynamic=False) for name, model in
                    (("twotower", twotower), ("ar", ar))}  # fmt: skip
        steps |= {f"{name}_compiled": (lambda m: lambda ids: step(m, ids))(model) for name, model in compiled.items()}
    rows = []
    for length in args.lengths:
        ids = batch(twotower.config.vocab_size, length, args.tokens, args.device)
        times = median_pair(steps, ids, args.repeats, args.device)
        row = {
            "seq_len": length,
            "batch_size": ids.shape[0],
            "twotower_seconds": round(times["twotower"], 3),
            "ar_seconds": round(times["ar"], 3),
            "ratio": round(times["twotower"] / times["ar"], 3),
            "twotower_peak_mb": peak_mb(twotower, ids, model_argv, "twotower"),
            "ar_peak_mb": peak_mb(ar, ids, model_argv, "ar"),
        }
        if args.compile:
            row |= {
                "twotower_compiled_seconds": round(times["twotower_compiled"], 3),
                "ar_compiled_seconds": round(times["ar_compiled"], 3),
                "ratio_compiled": round(times["twotower_compiled"] / times["ar_compiled"], 3),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
