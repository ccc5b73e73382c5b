"""Command line: `python -m transformers_twotower generate "def fibonacci(n):"` and `... bench`.

    generate PROMPT [--model DIR] [--mode mask_diffusion|mock_ar|ar] [--threshold 0.8] [--block-size 16] [--steps 16]
                    [--max-new-tokens 128] [--device cpu] [--dtype auto|float32|bfloat16]
    bench [...]     the demo benchmark (benchmarks/bench_demo.py, from a checkout of the repository)

Without `--model`, `generate` uses the small demo TwoTower bundled with the package (trained on Python source).
"""

import argparse
import runpy
import sys
import time
from pathlib import Path


DEMO_MODEL = Path(__file__).parent / "demo"
MODES = ("mask_diffusion", "mock_ar", "ar")
DTYPES = ("auto", "float32", "bfloat16")


def load(model_dir: str | Path, device: str, dtype: str):
    """Tokenizer and model from a folder, with errors that say what is missing."""
    import torch
    from transformers import AutoTokenizer

    from transformers_twotower import TwoTowerForDiffusionLM

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: no TwoTower model in {folder} (no config.json); pass --model DIR")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SystemExit(f"error: {folder} has no tokenizer files")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # this package is the code
    model = TwoTowerForDiffusionLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    return tokenizer, model


def generate(args) -> int:
    import torch
    from transformers import TextStreamer

    tokenizer, model = load(args.model, args.device, args.dtype)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1).to(args.device)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(
        ids,
        generation_mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        steps_per_block=args.steps,
        confidence_threshold=args.threshold,
        streamer=streamer,
        return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    print(
        f"\n--- {args.mode}: {new_tokens} tokens, NFE {out.nfe.item()}, "
        f"{out.tokens_per_forward.item():.2f} tokens/forward, {new_tokens / seconds:.1f} tokens/s"
    )
    return 0


def bench(argv: list[str]) -> int:
    checkout = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (checkout / "bench_demo.py").is_file():
        raise SystemExit("error: the benchmark lives in benchmarks/ of the repository; run it from a checkout")
    return runpy.run_path(str(checkout / "bench_demo.py"), run_name="bench_demo")["main"](argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m transformers_twotower", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="the demo benchmark (see benchmarks/bench_demo.py --help)")
    gen = commands.add_parser("generate", help="generate after a prompt, streaming the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=str(DEMO_MODEL), help="a TwoTower folder (default: the bundled demo)")
    gen.add_argument("--mode", choices=MODES, default="mask_diffusion")
    gen.add_argument("--threshold", type=float, default=0.8, help="confidence threshold (mask diffusion)")
    gen.add_argument("--block-size", type=int, default=16)
    gen.add_argument("--steps", type=int, default=16, help="denoiser steps per block at most")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    try:
        return generate(args)
    except ValueError as error:  # a knob generate() refuses, e.g. --threshold 5
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
