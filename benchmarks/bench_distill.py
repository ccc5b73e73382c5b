"""Self-distillation of the demo's denoiser, measured: `examples/finetune_denoiser.py --distill` on the demo.

    python benchmarks/bench_distill.py [--max-steps 4000] [--distill-prompts 8192] [--lr 2e-4] [--threads 1]
        [-- more flags for finetune_denoiser.py]

The data is the demo's own training split: the standard library's Python source minus the held-out modules named
in the demo's `train_log.json`, one module per JSONL row; the evaluation prompts are cut from the held-out modules
(never trained on, by the backbone or the denoiser). The AR tower's greedy continuations of the training prompts are
the targets; tokens per denoiser forward and agreement with AR are measured before and after, on 32 held-out prompts.
Writes `benchmarks/results/distill_cpu.json` (the script's report, the arguments and the CPU seconds it took); the
distilled model goes to a temporary folder (`--output` keeps it). A flag given after `--` replaces the script's own
value of that flag (e.g. `-- --lr 1e-4`), so the recorded flags hold each flag once, with the value that was used.
"""

import argparse
import importlib.util
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src/transformers_twotower/demo"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merge_flags(flags: list[str], extra: list[str]) -> list[str]:
    """`flags` with `extra` applied: a flag in both keeps its place in `flags` and takes `extra`'s value (or values,
    up to the next flag); flags new in `extra` are appended. `--flag=value` is read as `--flag value`."""

    def parse(tokens: list[str]) -> dict[str, list[str]]:
        parsed, name = {}, None
        for token in tokens:
            if token.startswith("--"):
                name, _, value = token.partition("=")
                parsed[name] = [value] if value else []
            elif name is None:
                raise SystemExit(f"error: {token!r} after -- is not preceded by a flag")
            else:
                parsed[name].append(token)
        return parsed

    merged = parse(flags)
    merged.update(parse(extra))  # a dict keeps the first position of a key and takes the last value
    return [token for name, values in merged.items() for token in (name, *values)]


def write_jsonl(paths: list[Path], target: Path):
    with target.open("w") as file:
        for path in paths:
            file.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--distill-prompts", type=int, default=8192)
    parser.add_argument("--lr", default="2e-4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="keep the distilled model here")
    parser.add_argument("extra", nargs="*", help="more flags for finetune_denoiser.py (after --)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    finetune = load_example("finetune_denoiser")
    train_files, _ = load_example("train_demo").stdlib_files()
    held_out = json.loads((DEMO / "train_log.json").read_text())["held_out"]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_jsonl(train_files, scratch / "train.jsonl")
        write_jsonl([stdlib / name for name in held_out if (stdlib / name).is_file()], scratch / "held_out.jsonl")
        output = args.output or str(scratch / "distilled")
        flags = merge_flags([
            "--model", str(DEMO), "--data", str(scratch / "train.jsonl"), "--eval-data", str(scratch / "held_out.jsonl"),
            "--output", output, "--distill", "--distill-prompts", str(args.distill_prompts), "--eval-prompts", "32",
            "--max-steps", str(args.max_steps), "--batch-size", "8", "--lr", args.lr, "--cpu",
        ], args.extra)  # fmt: skip
        began = time.process_time()
        finetune.main(flags)
        seconds = time.process_time() - began
        report = json.loads((Path(output) / "distill_report.json").read_text())
    result = {
        **report,
        "cpu_seconds": round(seconds, 1),
        "threads": args.threads,
        "flags": flags[flags.index("--distill") :],
    }
    target = ROOT / "benchmarks/results/distill_cpu.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
