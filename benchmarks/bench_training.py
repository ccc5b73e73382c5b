"""Training cost: a TwoTower training step against an AR training step of the same backbone, at growing lengths.

    python benchmarks/bench_training.py [--model DIR] [--lengths 256 1024 4096 8192] [--tokens 4096] [--repeats 3]

For each length, one batch of `--tokens` tokens (batch = tokens / length, at least 1): the TwoTower step is
`model(input_ids, labels=input_ids).loss.backward()` (the frozen context tower without gradient, the denoiser with);
the AR step is the same on transformers' `NemotronHForCausalLM` holding the context tower (the backbone trained
autoregressively). Step time is process CPU time on 1 thread, the two alternated, median of `--repeats`. Peak
memory is how far one step lifts the peak resident set above what was resident before it, in a fresh process for
each (Linux: the peak is reset through /proc/self/clear_refs).
Writes `benchmarks/results/training_cpu.json`: a list of rows
`{seq_len, batch_size, twotower_seconds, ar_seconds, ratio, twotower_peak_mb, ar_peak_mb}`.
"""

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_compile import cpu_seconds


ROOT = Path(__file__).resolve().parents[1]


def load_models(folder: str):
    """The TwoTower in `folder` and transformers' Nemotron-H holding its context tower, both fp32 in train mode."""
    from transformers_twotower import TwoTowerForDiffusionLM
    from transformers_twotower.layout_twotower import context_tower_as_nemotron_h

    twotower = TwoTowerForDiffusionLM.from_pretrained(folder, dtype=torch.float32).train()
    return twotower, context_tower_as_nemotron_h(twotower)


def step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def batch(vocab: int, length: int, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(4, vocab, (max(1, tokens // length), length), generator=generator)


def peak_mb(folder: str, which: str, length: int, tokens: int) -> float:
    """One step in a fresh process (this script with `--peak`): its peak resident memory above the start, in MB."""
    command = [sys.executable, __file__, "--model", folder, "--tokens", str(tokens), "--peak", which, str(length)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return round(float(result.stdout.strip().splitlines()[-1]), 1)


def memory_kb(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, from /proc (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_peak(folder: str, which: str, length: int, tokens: int):
    twotower, ar = load_models(folder)
    model = twotower if which == "twotower" else ar
    ids = batch(twotower.config.vocab_size, length, tokens)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
    before = memory_kb("VmRSS")
    step(model, ids)
    print((memory_kb("VmHWM") - before) / 1024)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src/transformers_twotower/demo"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/training_cpu.json"))
    parser.add_argument("--peak", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.peak:
        measure_peak(args.model, args.peak[0], int(args.peak[1]), args.tokens)
        return 0
    twotower, ar = load_models(args.model)
    rows = []
    for length in args.lengths:
        ids = batch(twotower.config.vocab_size, length, args.tokens)
        step(twotower, ids), step(ar, ids)  # warm-up
        times = {"twotower": [], "ar": []}
        for _ in range(args.repeats):
            for name, model in (("twotower", twotower), ("ar", ar)):
                times[name].append(cpu_seconds(lambda: step(model, ids)))  # noqa: B023 (called at once)
        tt, ar_seconds = statistics.median(times["twotower"]), statistics.median(times["ar"])
        row = {
            "seq_len": length,
            "batch_size": ids.shape[0],
            "twotower_seconds": round(tt, 3),
            "ar_seconds": round(ar_seconds, 3),
            "ratio": round(tt / ar_seconds, 3),
            "twotower_peak_mb": peak_mb(args.model, "twotower", length, args.tokens),
            "ar_peak_mb": peak_mb(args.model, "ar", length, args.tokens),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"wrote {args.output}  (peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
