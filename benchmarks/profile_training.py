"""Where a training step's time goes: TwoTower's parts beside the AR step's, per length (docs/training.md, "Where the
time goes").

    python benchmarks/profile_training.py [--model DIR] [--lengths 256 1024 4096 8192] [--tokens 4096] [--repeats 3]

The steps are `bench_training`'s (the same batches, models and clock: process CPU time on 1 thread, median of
`--repeats`). Each part is timed alone, on the inputs it received in a real step (captured by hooks), forward and
backward where the step differentiates it:

- TwoTower: the context tower's pass (`training_context`, no gradient); the denoiser's attention, Mamba and MoE
  mixers, each kind summed over its layers; the head and the loss;
- AR (transformers' Nemotron-H holding the context tower): its attention, Mamba and MoE mixers; the head and the loss;
- `rest`: the whole step less its parts (embeddings, norms, time modulation, residuals, masking, and whatever the
  parts cost together but not alone).

Writes `benchmarks/results/training_profile_cpu.json`: per length, the milliseconds of each part for both steps.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_compile import cpu_seconds
from bench_training import ROOT, batch, load_models, step


KINDS = {"full_attention": "attention", "linear_attention": "mamba", "moe": "moe"}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return round(1000 * statistics.median(cpu_seconds(fn) for _ in range(repeats)), 1)


def captured_calls(model, ids, modules: dict) -> list:
    """`(part, module, args, kwargs)` of every call of `modules` (`{module: part}`) during one step's forward."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((modules[module], module, args, kwargs))

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def forward_backward(module, args, kwargs):
    """The module's forward and backward on its hidden states, as a leaf with gradient (the rest as captured, less
    any cache the AR step writes into: a second call would read the first one's)."""
    kwargs = {**kwargs, **{key: None for key in ("cache_params", "past_key_values") if key in kwargs}}
    if args:
        args = (args[0].detach().requires_grad_(), *args[1:])
    else:
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(*args, **kwargs)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


def head_and_loss(lm_head, hidden, ids):
    hidden = hidden.detach().requires_grad_()
    lm_head.zero_grad(set_to_none=True)
    logits = lm_head(hidden).float()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()[: logits.shape[0] * logits.shape[1]]).backward()


def parts(model, layers, lm_head, ids, repeats: int) -> dict:
    """Milliseconds of each mixer kind (summed over its layers) and of the head with the loss, in a real step."""
    modules = {layer.mixer: KINDS[layer.block_type] for layer in layers if layer.block_type in KINDS}
    modules[lm_head] = "head_and_loss"
    costs = dict.fromkeys([*dict.fromkeys(modules.values())], 0.0)
    for part, module, args, kwargs in captured_calls(model, ids, modules):
        if part == "head_and_loss":
            costs[part] += median_ms(lambda: head_and_loss(module, args[0], ids), repeats)  # noqa: B023
        else:
            costs[part] += median_ms(lambda: forward_backward(module, args, kwargs), repeats)  # noqa: B023
    return {name: round(value, 1) for name, value in costs.items()}


def profile(twotower, ar, length: int, tokens: int, repeats: int) -> dict:
    ids = batch(twotower.config.vocab_size, length, tokens)
    whole = {
        name: median_ms(lambda: step(model, ids), repeats) for name, model in (("twotower", twotower), ("ar", ar))
    }  # noqa: B023
    block = twotower.config.block_size
    context = median_ms(lambda: twotower.context_tower.training_context(ids, torch.ones_like(ids), block), repeats)  # noqa: B023
    ours = {
        "context_tower": context,
        **parts(twotower, twotower.denoiser_tower.layers, twotower.lm_head, ids, repeats),
    }
    theirs = parts(ar, ar.model.layers, ar.lm_head, ids, repeats)
    row = {"seq_len": length, "batch_size": ids.shape[0]}
    for name, costs in (("twotower", ours), ("ar", theirs)):
        row[name] = {"step": whole[name], **costs, "rest": round(whole[name] - sum(costs.values()), 1)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src/transformers_twotower/demo"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/training_profile_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    twotower, ar = load_models(args.model)
    if twotower.config.block_size and any(length % twotower.config.block_size for length in args.lengths):
        raise SystemExit(f"error: every length must be a multiple of the block size {twotower.config.block_size}")
    rows = []
    for length in args.lengths:
        rows.append(profile(twotower, ar, length, args.tokens, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
