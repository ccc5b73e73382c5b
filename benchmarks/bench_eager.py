"""Eager `generate` against another checkout of the package, one thread, process CPU time.

    python benchmarks/bench_eager.py --other /path/to/other/checkout [--rounds 3] [--repeats 5]

On the release fixture, after its `main` prompt and a batch of four ragged prompts (left-padded, one row ending early
at an EOS), greedy, 64 new tokens, each mode (AR, Mock-AR, mask diffusion) is timed in this checkout's package and in
`--other`'s, each in processes of its own, the two alternated `--rounds` times; each process reports the median of
`--repeats` calls. The ratio other/this (above 1: this checkout is faster) is the median over rounds. Both must give
the same tokens and NFE. Writes `benchmarks/results/eager_generate_cpu.json`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "modeling_tests/fixtures/twotower_tiny_a"

MEASURE = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
from transformers_twotower import TwoTowerForDiffusionLM
model = TwoTowerForDiffusionLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompt = json.load(open(sys.argv[1] + "/expected.json"))["prompts"]["main"]
single = torch.tensor([prompt])
rows = [prompt, prompt[3:], prompt[:7], prompt[5:]]
width = max(map(len, rows))
batch = torch.tensor([[0] * (width - len(r)) + r for r in rows])
mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
out = {}
for name, ids, kwargs in [("single", single, {}), ("batch", batch, {"attention_mask": mask})]:
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        call = lambda: model.generate(ids, generation_mode=mode, max_new_tokens=64, eos_token_id=int(sys.argv[3]),
                                      return_dict_in_generate=True, **kwargs)
        result = call()
        times = []
        for _ in range(int(sys.argv[2])):
            began = time.process_time(); call(); times.append(time.process_time() - began)
        out[f"{name}/{mode}"] = dict(ms=statistics.median(times) * 1e3, tokens=result.sequences.tolist(),
                                     nfe=result.nfe.tolist())
print(json.dumps(out))
"""


def run(source: Path, repeats: int, eos: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(FIXTURE), str(repeats), str(eos)],
        env={"PYTHONPATH": str(source / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eos", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/eager_generate_cpu.json"))
    args = parser.parse_args(argv)
    began = time.time()
    ratios, this_ms, other_ms = {}, {}, {}
    for _ in range(args.rounds):
        this, other = run(ROOT, args.repeats, args.eos), run(args.other, args.repeats, args.eos)
        for key in this:
            if this[key]["tokens"] != other[key]["tokens"] or this[key]["nfe"] != other[key]["nfe"]:
                raise SystemExit(f"{key}: the two checkouts gave other tokens or NFE")
            ratios.setdefault(key, []).append(other[key]["ms"] / this[key]["ms"])
            this_ms.setdefault(key, []).append(this[key]["ms"])
            other_ms.setdefault(key, []).append(other[key]["ms"])
    result = {
        "model": "twotower_tiny_a",
        "threads": 1,
        "clock": "process_time",
        "new_tokens": 64,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "other": subprocess.run(
            ["git", "-C", str(args.other), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "this_ms": {k: round(statistics.median(v), 2) for k, v in this_ms.items()},
        "other_ms": {k: round(statistics.median(v), 2) for k, v in other_ms.items()},
        "other_over_this": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "seconds": round(time.time() - began, 1),
    }
    print(json.dumps(result, indent=2))
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
