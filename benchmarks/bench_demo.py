"""The demo benchmark: mask diffusion against AR on held-out Python, quality and speed in one process.

    python -m transformers_twotower bench [--model DIR] [--prompts 32] [--repeats 3] [--batch-sizes 1 8]
        [--thresholds 0.5 0.7 0.8 0.9 0.95] [--output benchmarks/results/demo_cpu.json] [--device cpu]
    python -m transformers_twotower bench --step-costs                  # one step of each kind, on the model
    python -m transformers_twotower bench --device cuda --synthetic     # GPU: step costs at the real model's size

Prompts: `--prompts` windows of 128 tokens from the held-out stdlib modules listed in the demo's `train_log.json`
(never trained on), each followed by its true 32-token continuation. For AR and for mask diffusion at each threshold
(block 16, 16 steps, greedy), at each batch size:

- exact_match: the fraction of the 32 generated tokens equal to the true continuation, averaged over prompts;
  retention = diffusion exact_match / AR exact_match;
- tokens_per_forward: generated tokens per denoiser forward (AR: per context-tower forward, i.e. 1);
- throughput_ratio: AR wall-clock / this mode's wall-clock, same prompts and batch size, runs alternated, median of
  `--repeats`; tokens_per_second from the median;
- context_tokens_per_token: context-tower token columns processed per generated token (per row).

Writes the rows as JSON, a PNG plot (throughput ratio against quality retention; needs matplotlib), and prints a table.
"""

import argparse
import json
import statistics
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm


ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src/transformers_twotower/demo"
PROMPT_TOKENS, CONTINUATION_TOKENS = 128, 32


def held_out_windows(tokenizer, modules: list[str], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (prompt, continuation) windows spread evenly over the held-out modules' token streams."""
    root = Path(sysconfig.get_paths()["stdlib"])
    streams = []
    for name in modules:
        path = root / name
        if path.is_file():
            # The tokenizer puts BOS first, as training and the pipeline see a text.
            streams.append(tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids)
    span = PROMPT_TOKENS + CONTINUATION_TOKENS
    starts = [(s, i) for s, ids in enumerate(streams) for i in range(0, len(ids) - span, span)]
    if len(starts) < count:
        raise SystemExit(f"error: the held-out modules give {len(starts)} windows, fewer than --prompts {count}")
    chosen = [starts[round(k * (len(starts) - 1) / max(1, count - 1))] for k in range(count)]
    windows = torch.tensor([streams[s][i : i + span] for s, i in chosen])
    return windows[:, :PROMPT_TOKENS], windows[:, PROMPT_TOKENS:]


@contextmanager
def counting_context_tokens(model):
    """Count the token columns the context tower processes (each column is one token of every row)."""
    counter = {"columns": 0}
    tower = model.context_tower
    original = tower._append

    def append(cache, token_ids, attention_mask):
        counter["columns"] += token_ids.shape[1]
        return original(cache, token_ids, attention_mask)

    tower._append = append
    try:
        yield counter
    finally:
        del tower._append


def run_mode(model, prompts, batch_size, mode, threshold, device):
    """Generate for every prompt. Returns (generated ids, seconds, NFE per row, context-tower tokens processed per
    row after the prompt, summed over rows)."""
    outputs, nfe, seconds, context = [], [], 0.0, 0
    with counting_context_tokens(model) as counter:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size].to(device)
            columns_before = counter["columns"]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = model.generate(
                batch,
                generation_mode=mode,
                max_new_tokens=CONTINUATION_TOKENS,
                block_size=16,
                steps_per_block=16,
                confidence_threshold=threshold,
                eos_token_id=None,
                return_dict_in_generate=True,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - began
            outputs.append(out.sequences[:, PROMPT_TOKENS:].cpu())
            nfe.append(out.nfe.cpu())
            context += (counter["columns"] - columns_before - PROMPT_TOKENS) * batch.shape[0]
    return torch.cat(outputs), seconds, torch.cat(nfe), context


def benchmark(model, prompts, truth, batch_sizes, thresholds, repeats, device) -> list[dict]:
    configs = [("ar", None)] + [("mask_diffusion", t) for t in thresholds]
    rows = []
    total = len(batch_sizes) * repeats * len(configs)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for batch_size in batch_sizes:
            times = {c: [] for c in configs}
            results = {}
            for _ in range(repeats):  # alternate the modes inside every repeat
                for config in configs:
                    mode, threshold = config
                    generated, seconds, nfe, context = run_mode(
                        model, prompts, batch_size, mode, threshold or 0.8, device
                    )
                    times[config].append(seconds)
                    results[config] = (generated, nfe, context)
                    bar.update()
            ar_time = statistics.median(times[("ar", None)])
            ar_match = (results[("ar", None)][0] == truth).float().mean().item()
            for config in configs:
                mode, threshold = config
                generated, nfe, context = results[config]
                median = statistics.median(times[config])
                match = (generated == truth).float().mean().item()
                rows.append(
                    dict(
                        mode=mode,
                        threshold=threshold,
                        batch_size=batch_size,
                        exact_match=round(match, 4),
                        retention=round(match / ar_match, 4) if ar_match else None,
                        tokens_per_forward=round(generated.numel() / nfe.sum().item(), 3),
                        throughput_ratio=round(ar_time / median, 3),
                        tokens_per_second=round(generated.numel() / median, 1),
                        context_tokens_per_token=round(context / generated.numel(), 3),
                        seconds_median=round(median, 3),
                    )
                )
    return rows


def print_table(rows: list[dict]):
    header = f"{'mode':>15} {'thr':>5} {'bs':>3} {'exact':>6} {'retain':>7} {'tok/fwd':>8} {'speedup':>8} {'tok/s':>8} {'ctx/tok':>7}"
    print(header)
    for r in rows:
        threshold = "" if r["threshold"] is None else f"{r['threshold']:.2f}"
        print(
            f"{r['mode']:>15} {threshold:>5} {r['batch_size']:>3} {r['exact_match']:>6.3f} {r['retention']:>7.3f} "
            f"{r['tokens_per_forward']:>8.2f} {r['throughput_ratio']:>7.2f}x {r['tokens_per_second']:>8.1f} "
            f"{r['context_tokens_per_token']:>7.3f}"
        )


def plot(rows: list[dict], path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for batch_size in sorted({r["batch_size"] for r in rows}):
        points = [r for r in rows if r["batch_size"] == batch_size and r["mode"] == "mask_diffusion"]
        axis.plot(
            [r["retention"] for r in points],
            [r["throughput_ratio"] for r in points],
            "o-",
            label=f"batch {batch_size}",
        )
        for r in points:
            axis.annotate(
                f"{r['threshold']}",
                (r["retention"], r["throughput_ratio"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.axvline(1.0, color="grey", lw=0.8)
    axis.scatter([0.987], [2.42], marker="*", s=120, color="black", label="release (30B, 2xH100)")
    axis.set_xlabel("quality retention (exact match vs AR)")
    axis.set_ylabel("throughput vs AR")
    axis.set_title("TwoTower demo: mask diffusion, block 16 (labels: threshold)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def step_costs(model, device: str, prompt_length: int = 512) -> dict:
    """After a `prompt_length`-token prompt: one denoiser step over a 16-token block and one context extension by a
    block, against one AR decode step (a one-token extension with its next-token logits); medians, in ms."""

    def timed(fn, repeats=20):
        fn()  # warm-up
        values = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            values.append(time.perf_counter() - began)
        return statistics.median(values)

    config = model.config
    prompt = torch.randint(4, config.vocab_size, (1, prompt_length), device=device)
    block = torch.full((1, 16), config.mask_token_id, device=device)
    with torch.no_grad():
        cache = model.prefill(prompt)
        denoise = timed(lambda: model.denoise_step(block, cache, torch.ones(1, device=device)))
        # The context grows while these are timed (by 21 tokens, and by 21 blocks): small next to the prompt.
        ar = timed(lambda: model.extend_context(cache, prompt[:, :1], keep_behind=False))
        extend = timed(lambda: model.extend_context(cache, prompt[:, :16], keep_behind=False))
    return {
        "device": device,
        "dtype": str(model.dtype),
        "threads": torch.get_num_threads(),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "denoise_step_ms": round(denoise * 1e3, 3),
        "ar_step_ms": round(ar * 1e3, 3),
        "extend_block_ms": round(extend * 1e3, 3),
        "denoise_step_over_ar_step": round(denoise / ar, 3),
        "extend_block_over_ar_step": round(extend / ar, 3),
    }


def synthetic_model(device: str, scale: str):
    """Random weights at the real model's shape (`real`: the release's 52-layer pattern and widths, 8 experts instead
    of 128 to fit one GPU, bf16) or a small stand-in that runs the same code on a CPU."""
    from transformers_twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    if scale == "real":
        config = TwoTowerConfig(
            vocab_size=131072, hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
            hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", mamba_num_heads=64,
            mamba_head_dim=64, n_groups=8, ssm_state_size=128, chunk_size=128, n_routed_experts=8,
            num_experts_per_tok=6, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
            routed_scaling_factor=2.5,
        )  # fmt: skip
        dtype = torch.bfloat16
    else:
        config = TwoTowerConfig(
            vocab_size=512, hidden_size=64, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
            chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=64,
        )  # fmt: skip
        dtype = torch.float32
    with torch.device(device):
        return TwoTowerForDiffusionLM(config).to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformers_twotower bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default=str(DEMO), help="a TwoTower folder with train_log.json (default: the demo)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/demo_cpu.json"))
    parser.add_argument("--step-costs", action="store_true", help="time one denoiser step, AR step, extension")
    parser.add_argument("--synthetic", action="store_true", help="step costs at the real model's size, random weights")
    parser.add_argument("--synthetic-scale", choices=["real", "small"], default="real")
    args = parser.parse_args(argv)

    if args.synthetic:
        if args.synthetic_scale == "real" and not args.device.startswith("cuda"):
            print("skipped: the synthetic run at the real model's size needs --device cuda (bf16, mamba-ssm kernels)")
            return 0
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("skipped: --device cuda but CUDA is not available")
            return 0
        result = step_costs(synthetic_model(args.device, args.synthetic_scale), args.device)
        print(json.dumps({"model": f"synthetic ({args.synthetic_scale})", **result}, indent=2))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")

    from transformers import AutoTokenizer

    from transformers_twotower import TwoTowerForDiffusionLM

    folder = Path(args.model)
    log_path = folder / "train_log.json"
    if not log_path.is_file():
        raise SystemExit(f"error: {folder} has no train_log.json naming its held-out modules")
    held_out = json.loads(log_path.read_text())["held_out"]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # this package is the code
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = TwoTowerForDiffusionLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    torch.set_grad_enabled(False)
    if args.step_costs:
        print(json.dumps({"model": str(folder), **step_costs(model, args.device)}, indent=2))
        return 0
    prompts, truth = held_out_windows(tokenizer, held_out, args.prompts)

    rows = benchmark(model, prompts, truth, args.batch_sizes, args.thresholds, args.repeats, args.device)
    print_table(rows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    setting = dict(device=args.device, threads=torch.get_num_threads(), prompts=args.prompts, repeats=args.repeats)
    output.write_text(json.dumps([{**row, **setting} for row in rows], indent=2) + "\n")
    print(f"wrote {output}")
    plot(rows, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
