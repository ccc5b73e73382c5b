"""Compile time of `generate(compile=True)` against depth: is it flat?

    python benchmarks/bench_compile_depth.py [--depths 4 8 26] [--experts 8] [--threads 2]

For each depth, in a fresh process with inductor's on-disk caches off (a user's first compile): a synthetic TwoTower
at the release's real widths (`bench_steps.synthetic_model`, bf16, the first `depth` layers of the release's pattern;
`--experts` routed experts per MoE layer, 8 by default to fit a CPU's memory: the experts' count changes the weights'
size, not the graph), a 16-token prompt, then per mode (AR, mask diffusion) one eager `generate` of one block and the
first compiled one. The compile time is the compiled call's wall time less the eager call's; the graphs dynamo
compiled are counted. Each block's forward is a nested compile region (docs/architecture.md, "Decoding"), so depth
should add tracing of one more call per layer, not a compilation. Writes `benchmarks/results/compile_depth_cpu.json`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
import torch, torch._dynamo, torch._inductor.config
sys.path.insert(0, sys.argv[4])
from bench_steps import synthetic_model
torch.set_num_threads(int(sys.argv[3]))
torch._inductor.config.force_disable_caches = True
model = synthetic_model(int(sys.argv[1]), int(sys.argv[2]), "real", "cpu", torch.bfloat16)
prompt = torch.randint(4, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
out = {}
for mode in ("ar", "mask_diffusion"):
    options = dict(generation_mode=mode, max_new_tokens=16, steps_per_block=4, eos_token_id=None)
    began = time.perf_counter(); eager = model.generate(prompt, **options); eager_s = time.perf_counter() - began
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    began = time.perf_counter(); compiled = model.generate(prompt, compile=True, **options)
    compiled_s = time.perf_counter() - began
    out[mode] = dict(compile_seconds=round(compiled_s - eager_s, 1), eager_seconds=round(eager_s, 2),
                     graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
                     same_tokens=bool(torch.equal(eager, compiled)))
print(json.dumps(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 26])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/compile_depth_cpu.json"))
    args = parser.parse_args(argv)
    began = time.time()
    rows = {}
    for depth in args.depths:
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, str(depth), str(args.experts), str(args.threads), str(ROOT / "benchmarks")],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode:
            raise SystemExit(f"depth {depth} failed:\n{result.stderr[-3000:]}")
        rows[f"{depth}_layers"] = json.loads(result.stdout.strip().splitlines()[-1])
        print(depth, rows[f"{depth}_layers"], flush=True)
    output = {
        "model": f"synthetic real widths, bf16, {args.experts} experts per MoE layer",
        "threads": args.threads,
        "caches": "inductor's on-disk caches off",
        "depths": rows,
        "seconds": round(time.time() - began, 1),
    }
    Path(args.output).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
