"""The demo benchmark: mask diffusion against AR on held-out Python, quality and speed in one process.

    python -m transformers_twotower bench [--model DIR] [--prompts 32] [--repeats 3] [--batch-sizes 1 8]
        [--thresholds 0.5 0.7 0.8 0.9 0.95] [--output benchmarks/results/demo_cpu.json] [--device cpu]
    python -m transformers_twotower bench --step-costs [--label after] [--compile]   # one step of each kind
    python -m transformers_twotower bench --synthetic [...]   # step costs at the release's widths (bench_steps.py)

Prompts: `--prompts` windows of 128 tokens from the held-out stdlib modules listed in the demo's `train_log.json`
(never trained on), each followed by its true 32-token continuation. Two scenarios, at each batch size:

- `plain`: AR and mask diffusion at each threshold (block 16, 16 steps, greedy), 32 tokens, no EOS;
- `mixed`: prompts cut to different lengths (32 to 128 tokens, left-padded in a batch) and a row stops at its first
  blank line or EOS, so rows finish early and at different times; AR and diffusion at threshold 0.8.

Greedy means plain greedy in both: the demo's generation config sets `repetition_penalty=1.2`, which is set back to
1.0 here (`--quality` measures the penalty).

Per row of the output:
- exact_match: the fraction of generated tokens equal to the true continuation, averaged over prompts;
  retention = diffusion exact_match / AR exact_match;
- agreement_with_ar: the fraction of AR's generated tokens that this mode generates at the same position (greedy
  both): quality retention that needs no labels;
- ar_confident_fraction: teacher-forced on the true continuations, the fraction of tokens on which the AR tower's
  top probability exceeds the row's threshold. It bounds how much parallel commitment this model could show;
- tokens_per_forward: generated tokens per denoiser forward (AR: per context-tower forward, i.e. 1);
- throughput_ratio: this mode's generated tokens per second over AR's, same prompts and batch size, runs alternated,
  median of `--repeats`; tokens_per_second from the median;
- context_tokens_per_token: tokens the context tower processed after the prompts, per generated token.

`--step-costs` runs benchmarks/bench_steps.py's measurement on the demo: the static-decoding steps (AR step,
denoiser step on a masked and a half-filled block, block extension) after a 512-token prompt at batch 1 and 8, eager
and with `--compile` compiled, beside their memory floor, stored under `--label` in
`benchmarks/results/step_costs_<device>.json`.

Writes the rows as JSON, a PNG plot (throughput ratio against quality retention; needs matplotlib), and prints a table.
"""

import argparse
import json
import statistics
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers_twotower.defaults_twotower import MODEL_GENERATION_DEFAULTS as PUBLISHED  # the operating point
from transformers_twotower.loading_twotower import load
from transformers_twotower.metrics_twotower import generation_metrics, real_tokens


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
    """Count the tokens the context tower processes (rows times columns: a row that left the decode state costs
    none), by a hook on its forward."""
    counter = {"tokens": 0}

    def count(module, args, kwargs):
        counter["tokens"] += kwargs["input_ids"].numel()

    hook = model.context_tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counter
    finally:
        hook.remove()


@dataclass
class Scenario:
    """What a benchmark run generates: `prompts` (left-padded, with `mask`), up to `max_new_tokens`, stopping at
    `eos` (a list of ids; empty: never)."""

    name: str
    prompts: torch.Tensor
    mask: torch.Tensor
    truth: torch.Tensor
    eos: list[int]


def plain_scenario(prompts, truth) -> Scenario:
    return Scenario("plain", prompts, torch.ones_like(prompts), truth, [])


def mixed_scenario(tokenizer, prompts, truth) -> Scenario:
    """The prompts cut to lengths from 32 to 128 tokens (the end kept, so the true continuation still follows),
    left-padded; a row stops at its first blank line (the tokenizer's id for it) or EOS."""
    lengths = [32 + (k * 37) % 97 for k in range(len(prompts))]
    mask = torch.zeros_like(prompts)
    for row, length in enumerate(lengths):
        mask[row, -length:] = 1
    ids = prompts.masked_fill(mask == 0, tokenizer.pad_token_id)
    blank_line = tokenizer("\n\n", add_special_tokens=False).input_ids[-1]
    return Scenario("mixed", ids, mask, truth, [blank_line, tokenizer.eos_token_id])


def run_mode(model, scenario: Scenario, batch_size, mode, threshold, device):
    """Generate for every prompt. Returns (generated ids (N, 32), padded after a row's end, seconds, NFE per row,
    context-tower tokens processed per row after the prompt, summed over rows)."""
    outputs, nfe, seconds, context = [], [], 0.0, 0
    width = scenario.prompts.shape[1]
    with counting_context_tokens(model) as counter:
        for start in range(0, len(scenario.prompts), batch_size):
            batch = scenario.prompts[start : start + batch_size].to(device)
            mask = scenario.mask[start : start + batch_size].to(device)
            tokens_before = counter["tokens"]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = model.generate(
                batch,
                attention_mask=mask,
                generation_mode=mode,
                max_new_tokens=CONTINUATION_TOKENS,
                block_size=PUBLISHED["block_size"],
                steps_per_block=PUBLISHED["steps_per_block"],
                confidence_threshold=threshold,
                repetition_penalty=1.0,  # plain greedy (the demo's generation config: 1.2)
                eos_token_id=scenario.eos or None,
                return_dict_in_generate=True,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - began
            generated = out.sequences[:, width:].cpu()
            outputs.append(F.pad(generated, (0, CONTINUATION_TOKENS - generated.shape[1]), value=-1))
            nfe.append(out.nfe.cpu())
            context += counter["tokens"] - tokens_before - batch.numel()  # after the prompt
    return torch.cat(outputs), seconds, torch.cat(nfe), context


@torch.no_grad()
def ar_confidence(model, prompts, truth, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced on the true continuations: the AR tower's top probability at each continuation token and
    whether its top token is the true one, (N, 32) each."""
    windows = torch.cat([prompts, truth], dim=1).to(device)
    logits = model(windows).logits[:, prompts.shape[1] - 1 : -1].float()
    probabilities = logits.softmax(-1)
    top, top_token = probabilities.max(-1)
    return top.cpu(), (top_token.cpu() == truth)


def benchmark(model, scenarios, batch_sizes, thresholds, repeats, device) -> list[dict]:
    top_probability, ar_correct = ar_confidence(model, scenarios[0].prompts, scenarios[0].truth, device)
    rows = []
    mixed_thresholds = [PUBLISHED["confidence_threshold"]]
    total = sum(
        len(batch_sizes) * repeats * (1 + len(thresholds if s.name == "plain" else mixed_thresholds))
        for s in scenarios
    )
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for scenario in scenarios:
            configs = [("ar", None)] + [
                ("mask_diffusion", t) for t in (thresholds if scenario.name == "plain" else mixed_thresholds)
            ]
            for batch_size in batch_sizes:
                times = {c: [] for c in configs}
                results = {}
                for _ in range(repeats):  # alternate the modes inside every repeat
                    for config in configs:
                        mode, threshold = config
                        generated, seconds, nfe, context = run_mode(
                            model, scenario, batch_size, mode, threshold or PUBLISHED["confidence_threshold"], device
                        )
                        times[config].append(seconds)
                        results[config] = (generated, nfe, context)
                        bar.update()
                rows += scenario_rows(scenario, batch_size, configs, times, results, top_probability, ar_correct)
    return rows


def scenario_rows(scenario, batch_size, configs, times, results, top_probability, ar_correct) -> list[dict]:
    ar_generated = results[("ar", None)][0]
    eos = scenario.eos or None
    ar_real = real_tokens(ar_generated, eos)
    rows = []
    for config in configs:
        mode, threshold = config
        generated, nfe, context = results[config]
        real = real_tokens(generated, eos)
        metrics = generation_metrics(generated, nfe, eos, reference=ar_generated)
        tokens = metrics["generated_tokens"]
        median = statistics.median(times[config])
        ar_tokens_per_second = int(ar_real.sum()) / statistics.median(times[("ar", None)])
        match = ((generated == scenario.truth) & real).sum() / tokens
        ar_match = ((ar_generated == scenario.truth) & ar_real).sum() / int(ar_real.sum())
        rows.append(
            dict(
                scenario=scenario.name,
                mode=mode,
                threshold=threshold,
                batch_size=batch_size,
                exact_match=round(match.item(), 4),
                retention=round((match / ar_match).item(), 4) if ar_match else None,
                agreement_with_ar=round(metrics["agreement_with_ar"], 4),
                ar_confident_fraction=None
                if threshold is None
                else round((top_probability > threshold).float().mean().item(), 4),
                ar_teacher_forced_accuracy=round(ar_correct.float().mean().item(), 4) if mode == "ar" else None,
                tokens_per_forward=round(metrics["tokens_per_forward"], 3),
                throughput_ratio=round(tokens / median / ar_tokens_per_second, 3),
                tokens_per_second=round(tokens / median, 1),
                context_tokens_per_token=round(context / tokens, 3),
                generated_tokens=tokens,
                seconds_median=round(median, 3),
            )
        )
    return rows


def print_table(rows: list[dict]):
    header = (
        f"{'scenario':>8} {'mode':>15} {'thr':>5} {'bs':>3} {'exact':>6} {'retain':>7} {'agree':>6} {'ar>thr':>6} "
        f"{'tok/fwd':>8} {'speedup':>8} {'tok/s':>8} {'ctx/tok':>7}"
    )
    print(header)
    for r in rows:
        threshold = "" if r["threshold"] is None else f"{r['threshold']:.2f}"
        confident = "" if r["ar_confident_fraction"] is None else f"{r['ar_confident_fraction']:.3f}"
        print(
            f"{r['scenario']:>8} {r['mode']:>15} {threshold:>5} {r['batch_size']:>3} {r['exact_match']:>6.3f} "
            f"{r['retention']:>7.3f} {r['agreement_with_ar']:>6.3f} {confident:>6} {r['tokens_per_forward']:>8.2f} "
            f"{r['throughput_ratio']:>7.2f}x {r['tokens_per_second']:>8.1f} {r['context_tokens_per_token']:>7.3f}"
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


def demo_step_costs(model, args) -> int:
    """The demo's static-decoding steps after a 512-token prompt, batch 1 and 8 (benchmarks/bench_steps.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_steps import copy_bandwidth, measure, model_name, print_table, store

    variants = ["eager", "compiled"] if args.compile else ["eager"]
    repeats = max(5, args.repeats)
    began = time.process_time()
    bandwidth = copy_bandwidth(args.device, 256)
    batches = measure(model, [1, 8], variants, 512, repeats, bandwidth)
    result = {
        "model": model_name(args.model), "device": args.device, "threads": torch.get_num_threads(),
        "prompt_tokens": 512, "repeats": repeats, "bandwidth_gb_s": round(bandwidth / 1e9, 1), "batches": batches,
        "cpu_seconds_with_compilation": round(time.process_time() - began),
    }  # fmt: skip
    print_table(result, variants)
    print(f"wrote {store(result, args.device, args.label)}")
    return 0


def distinct_2(rows: torch.Tensor) -> float:
    """The mean over rows of distinct bigrams / bigrams in the generated tokens (1.0: no bigram repeats; loops lower
    it)."""
    fractions = [len(set(zip(row[:-1], row[1:]))) / max(1, len(row) - 1) for row in rows.tolist()]
    return sum(fractions) / len(fractions)


def demo_quality(model, prompts: torch.Tensor, args) -> int:
    """Degenerate loops against `repetition_penalty`: greedy mask diffusion with the demo's generation config on the
    held-out prompts, 64 new tokens, for each penalty; distinct-2 of the output and its agreement with greedy AR
    (whose own distinct-2 is the reference), stored in benchmarks/results/demo_quality_<device>.json."""
    new_tokens, batch = 64, 8

    def run(**options):  # generated tokens (N, 64) and the forwards per row
        tokens, forwards = [], []
        for i in range(0, len(prompts), batch):
            out = model.generate(
                prompts[i : i + batch].to(args.device), max_new_tokens=new_tokens, eos_token_id=None,
                return_dict_in_generate=True, **options,
            )  # fmt: skip
            tokens.append(out.sequences[:, -new_tokens:].cpu())
            forwards.append(out.nfe.cpu())
        return torch.cat(tokens), torch.cat(forwards)

    ar, _ = run(generation_mode="ar", repetition_penalty=1.0)
    rows = [dict(mode="ar", repetition_penalty=1.0, distinct_2=round(distinct_2(ar), 4), agreement_with_ar=1.0,
                 tokens_per_forward=1.0)]  # fmt: skip
    for penalty in args.penalties:
        diffusion, forwards = run(repetition_penalty=penalty)
        metrics = generation_metrics(diffusion, forwards, reference=ar)
        rows.append({
            "mode": "mask_diffusion", "repetition_penalty": penalty, "distinct_2": round(distinct_2(diffusion), 4),
            "agreement_with_ar": round(metrics["agreement_with_ar"], 4),
            "tokens_per_forward": round(metrics["tokens_per_forward"], 3),
        })  # fmt: skip
    for row in rows:
        print(f"{row['mode']:>15} penalty {row['repetition_penalty']:<5} distinct-2 {row['distinct_2']:.3f}  "
              f"agreement with AR {row['agreement_with_ar']:.3f}  tokens/forward {row['tokens_per_forward']:.2f}")  # fmt: skip
    output = ROOT / f"benchmarks/results/demo_quality_{args.device.split(':')[0]}.json"
    setting = {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "threshold": model.generation_config.confidence_threshold,
    }
    output.write_text(json.dumps({**setting, "rows": rows}, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


@torch.no_grad()  # (not a global switch: the tests call `main` in their own process)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformers_twotower bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default=str(DEMO), help="a TwoTower folder with train_log.json (default: the demo)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--scenarios", nargs="+", choices=["plain", "mixed"], default=["plain", "mixed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/demo_cpu.json"))
    parser.add_argument("--step-costs", action="store_true", help="time one denoiser step, AR step, extension")
    parser.add_argument("--label", default="after", help="--step-costs: the key the figures are stored under")
    parser.add_argument("--compile", action="store_true", help="--step-costs: also the compiled steps")
    parser.add_argument("--quality", action="store_true", help="distinct-2 and agreement with AR per --penalties")
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model)
    log_path = folder / "train_log.json"
    if not log_path.is_file():
        raise SystemExit(f"error: {folder} has no train_log.json naming its held-out modules")
    held_out = json.loads(log_path.read_text())["held_out"]
    tokenizer, model = load(folder, args.device, "auto")  # bf16 on CUDA, fp32 elsewhere
    if args.step_costs:
        return demo_step_costs(model, args)
    prompts, truth = held_out_windows(tokenizer, held_out, args.prompts)
    if args.quality:
        return demo_quality(model, prompts, args)
    scenarios = {"plain": plain_scenario(prompts, truth), "mixed": mixed_scenario(tokenizer, prompts, truth)}

    rows = benchmark(
        model, [scenarios[name] for name in args.scenarios], args.batch_sizes, args.thresholds, args.repeats,
        args.device,
    )  # fmt: skip
    print_table(rows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    setting = dict(device=args.device, threads=torch.get_num_threads(), prompts=args.prompts, repeats=args.repeats)
    output.write_text(json.dumps([{**row, **setting} for row in rows], indent=2) + "\n")
    print(f"wrote {output}")
    plot([row for row in rows if row["scenario"] == "plain"], output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
