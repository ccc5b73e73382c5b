"""Command line: `python -m transformers_twotower generate "def fibonacci(n):"` and `... bench`.

    generate PROMPT [--model DIR] [--mode mask_diffusion|mock_ar|ar] [--threshold 0.8] [--block-size 16] [--steps 16]
                    [--max-new-tokens 128 | --max-length N] [--device cpu] [--dtype auto|float32|bfloat16]
    bench [...]     the demo benchmark (benchmarks/bench_demo.py, from a checkout of the repository)
    eval --tasks ... --modes ar mask_diffusion [--thresholds ...]   each mode's scores against AR's, tokens/s, NFE
    lm_eval [...]   lm-evaluation-harness's command line with the `twotower` model registered (the [eval] extra)

Without `--model`, `generate` uses the small demo TwoTower bundled with the package (trained on Python source).
"""

import argparse
import runpy
import sys
import time
from pathlib import Path

from .defaults_twotower import GENERATION_MODES, MODEL_GENERATION_DEFAULTS
from .loading_twotower import DEMO_MODEL, DTYPES, load, machine_device


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a one-line error naming the option)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def generate(args) -> int:
    from transformers import TextStreamer

    tokenizer, model = load(args.model, args.device, args.dtype)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(
        args.device
    )  # the tokenizer adds BOS, as in training
    # Options given on the command line; the others are the model's generation config (then TwoTower's defaults).
    given = dict(
        generation_mode=args.mode, block_size=args.block_size, steps_per_block=args.steps,
        confidence_threshold=args.threshold, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
    )  # fmt: skip
    options = {name: value for name, value in given.items() if value is not None}
    saved = {name: value for name, value in model.generation_config.to_dict().items() if value is not None}
    settings = {**MODEL_GENERATION_DEFAULTS, **saved, **options}
    # A short run first: transformers' one-time notices (which kernels fall back to PyTorch) go to stderr now, not
    # into the streamed text. It also checks the options before anything is printed.
    # Two blocks of one step each reach every kernel (prefill, denoiser step, block extension; AR: one-token decode).
    warm_up = {**options, "max_new_tokens": 2 * settings["block_size"], "max_length": None, "steps_per_block": 1}
    model.generate(ids[:, :1], **warm_up)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(ids, streamer=streamer, return_dict_in_generate=True, **options)
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    print(
        f"\n--- {settings['generation_mode']}: {new_tokens} tokens, NFE {out.nfe.item()}, "
        f"{out.tokens_per_forward.item():.2f} tokens/forward, {new_tokens / seconds:.1f} tokens/s"
    )
    return 0


def bench(argv: list[str]) -> int:
    """`bench --synthetic ...`: benchmarks/bench_steps.py (step costs at the release's widths); otherwise the demo
    benchmark, benchmarks/bench_demo.py."""
    script = "bench_steps.py" if "--synthetic" in argv else "bench_demo.py"
    checkout = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (checkout / script).is_file():
        raise SystemExit("error: the benchmark lives in benchmarks/ of the repository; run it from a checkout")
    return runpy.run_path(str(checkout / script), run_name=script.removesuffix(".py"))["main"](argv)


def with_machine_device(argv: list[str]) -> list[str]:
    """lm-eval's arguments, given the device this machine has when they run an evaluation and name none (lm-eval's
    default is `cuda:0`, also on a machine without CUDA). A device in `--model_args` counts as named; `ls`,
    `validate`, help and a bare command are passed on as they are (they take no `--device`)."""
    run = argv[1:] if argv[:1] == ["run"] else argv
    if not run or argv[0] in ("ls", "validate") or {"-h", "--help"} & set(argv):
        return argv
    options = dict(arg.split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    options |= {arg: value for arg, value in zip(argv, argv[1:]) if arg.startswith("--")}
    model_args = {pair.split("=", 1)[0].strip() for pair in options.get("--model_args", "").split(",")}
    named = "--device" in argv or "--device" in options or "device" in model_args
    return argv if named else [*argv, "--device", machine_device()]


def lm_eval(argv: list[str]) -> int:
    """lm-eval 0.4 looks models up in its own registry only: register `twotower`, then run its command line (on the
    machine's device unless one is named)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit('error: lm_eval needs the [eval] extra: pip install "transformers-twotower[eval]"')
    from . import lm_eval_twotower  # noqa: F401  (registers the model)

    sys.argv = ["lm_eval", *with_machine_device(argv)]
    cli_evaluate()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv[:1] == ["lm_eval"]:
        return lm_eval(argv[1:])
    if argv[:1] == ["eval"]:
        from .compare_twotower import main as compare

        return compare(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m transformers_twotower", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="the demo benchmark (see benchmarks/bench_demo.py --help)")
    commands.add_parser("eval", help="the same lm-eval tasks in each mode, against AR (see eval --help)")
    commands.add_parser("lm_eval", help="lm-evaluation-harness with the `twotower` model (see lm_eval --help)")
    gen = commands.add_parser("generate", help="generate after a prompt, streaming the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=str(DEMO_MODEL), help="a TwoTower folder (default: the bundled demo)")
    # Unset options are the model's generation config (`generation_config.json`), else TwoTower's defaults.
    lengths = gen.add_mutually_exclusive_group()
    for parser_of, flag, field, kind, what in (
        (gen, "--mode", "generation_mode", None, ""),
        (gen, "--threshold", "confidence_threshold", float, "confidence threshold (mask diffusion)"),
        (gen, "--block-size", "block_size", positive_int, ""),
        (gen, "--steps", "steps_per_block", positive_int, "denoiser steps per block at most"),
        (lengths, "--max-new-tokens", "max_new_tokens", positive_int, ""),
    ):
        default = f"default: the model's generation config, else {MODEL_GENERATION_DEFAULTS[field]}"
        choices = {"choices": GENERATION_MODES} if flag == "--mode" else {"type": kind}
        parser_of.add_argument(flag, **choices, help=f"{what} ({default})".strip())
    lengths.add_argument(
        "--max-length", type=positive_int, help="prompt + generated tokens (instead of --max-new-tokens)"
    )
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
