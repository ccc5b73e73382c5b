"""Whole `generate` calls on a CPU: compiled against eager, and the AR mode against transformers' own Nemotron-H.

    python benchmarks/bench_generate.py [--model DIR] [--threads 2] [--new-tokens 64] [--repeats 5]

On `--model` (default: the release fixture in modeling_tests/fixtures), after its recorded `main` prompt, greedy,
`--new-tokens` tokens with EOS off, five calls:

- `stock_ar`: transformers' `NemotronHForCausalLM.generate` holding the context tower's weights (the AR baseline as
  transformers runs it);
- `ar`, `ar_compiled`: this package's AR mode, eager and with `compile=True` (the static decode state's steps through
  inductor, fullgraph);
- `diffusion`, `diffusion_compiled`: mask diffusion with the model's defaults, eager and compiled.

The first compiled call compiles, from cold caches (inductor's on-disk caches are off): its wall time less an eager
call's is reported as the compile time, in seconds and in units of one `stock_ar` call (the issue's goals: at most
15 in AR, 30 in mask diffusion; machines differ in speed, and the unit moves with them). Then the calls
are alternated `--repeats` times and timed by process CPU time on `--threads` threads; the medians are reported with
the ratios the speed issue sets goals for. Every AR call must give the stock model's tokens, and compiled diffusion
the eager tokens and NFE, or the script stops. Writes `benchmarks/results/generate_cpu.json`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config


ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "modeling_tests/fixtures/twotower_tiny_a"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/generate_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # cold caches: every compile is a user's first
    from bench_compile import cpu_seconds
    from bench_training import load_models

    model, stock = load_models(args.model)
    model, stock = model.eval(), stock.eval()
    expected = Path(args.model, "expected.json")
    if expected.exists():
        prompt = json.loads(expected.read_text())["prompts"]["main"]
    else:
        prompt = torch.randint(4, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt])
    common = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    calls = {
        "stock_ar": lambda: stock.generate(ids, **common, pad_token_id=0),
        "ar": lambda: model.generate(ids, generation_mode="ar", **common),
        "ar_compiled": lambda: model.generate(ids, generation_mode="ar", compile=True, **common),
        "diffusion": lambda: model.generate(ids, return_dict_in_generate=True, **common),
        "diffusion_compiled": lambda: model.generate(ids, compile=True, return_dict_in_generate=True, **common),
    }
    with torch.no_grad():
        outputs, compile_seconds = {}, {}
        for name, call in calls.items():
            began = time.perf_counter()
            outputs[name] = call()
            compile_seconds[name] = time.perf_counter() - began
        for name in ("ar", "ar_compiled"):
            if not torch.equal(outputs[name], outputs["stock_ar"]):
                raise SystemExit(f"{name} gave other tokens than transformers' Nemotron-H")
        eager, compiled = outputs["diffusion"], outputs["diffusion_compiled"]
        if not (torch.equal(eager.sequences, compiled.sequences) and torch.equal(eager.nfe, compiled.nfe)):
            raise SystemExit("compiled mask diffusion gave other tokens or NFE than eager")
        times = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                times[name].append(cpu_seconds(call))
    ms = {name: round(statistics.median(values) * 1e3, 2) for name, values in times.items()}
    result = {
        "model": Path(args.model).name,
        "threads": args.threads,
        "clock": "process_time",
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "diffusion_nfe": int(eager.nfe.sum()),
        "median_ms": ms,
        "compile_seconds": {
            "ar": round(compile_seconds["ar_compiled"] - compile_seconds["ar"], 1),
            "diffusion": round(compile_seconds["diffusion_compiled"] - compile_seconds["diffusion"], 1),
        },
        "compile_in_stock_ar_calls": {  # the compile seconds over the median `stock_ar` call
            mode: round((compile_seconds[f"{name}_compiled"] - compile_seconds[name]) / (ms["stock_ar"] / 1e3), 1)
            for mode, name in (("ar", "ar"), ("diffusion", "diffusion"))
        },
        "speedup": {
            "ar_compiled_over_stock_ar": round(ms["stock_ar"] / ms["ar_compiled"], 3),
            "ar_eager_over_stock_ar": round(ms["stock_ar"] / ms["ar"], 3),
            "ar_compiled_over_ar_eager": round(ms["ar"] / ms["ar_compiled"], 3),
            "diffusion_compiled_over_diffusion_eager": round(ms["diffusion"] / ms["diffusion_compiled"], 3),
            "diffusion_compiled_over_stock_ar": round(ms["stock_ar"] / ms["diffusion_compiled"], 3),
        },
    }
    print(json.dumps(result, indent=2))
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {Path(args.output).relative_to(ROOT) if Path(args.output).is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
