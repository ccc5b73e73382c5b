"""Step costs of static decoding, beside the memory floor each step cannot beat.

    python -m transformers_twotower bench --synthetic [--layers 26] [--experts 128] [--batch-sizes 1 8 32]
        [--device cuda] [--variants eager cuda_graph compiled] [--prompt-length 512] [--label synthetic]
        [--ep-size 2 4 8]

Random weights at the release's real widths (hidden 2688, Mamba 64x64 heads, chunk 128, 128 routed experts top-6
plus the shared expert, 131072-token vocabulary), the first `--layers` of its 52-layer pattern, both towers, built
directly in bf16 on the device. `--scale small` runs the same code at a small width on a CPU (the test suite does).

After a `--prompt-length` prompt, per batch size, four steps on the static decode state:

- `ar_step`: one token per row through the context tower, next-token logits out (the AR baseline's step);
- `denoise_masked`, `denoise_half`: the denoiser over a 16-token block, all masked (t = 1) and half filled (t = 0.5);
- `extend_block`: a committed 16-token block through the context tower.

Each as `eager` (the step functions as they are), `cuda_graph` (captured once into a `torch.cuda.CUDAGraph`,
then replayed) and `compiled` (what `generate(compile=True)` runs: inductor with `fullgraph=True`, and CUDA graphs
on CUDA via `mode="reduce-overhead"`). Times are the median of `--repeats` synchronised runs, each the mean of
several calls.

Beside each: the bytes the step must read (the weights it touches, routed experts counted as the distinct experts
its tokens select in each MoE layer, the head, the K/V it attends over and the Mamba states it reads and writes),
the memory floor (those bytes over the bandwidth of a large device-to-device copy measured in the same run) and
time over floor; and the diffusion/AR throughput the step costs imply at 2, 3 and 5 tokens per forward, beside the
release's 2.42x. Stored under `--label` in `benchmarks/results/step_costs_<device>.json`.

With `--ep-size N [N ...]`, the same steps split over N GPUs by expert parallelism, by arithmetic on the experts the
step's tokens selected (`expert_parallel_bytes`): the bytes the busiest GPU reads (its share of the distinct experts
in each MoE layer, plus everything replicated), the half-filled denoiser step over the AR step, and the diffusion/AR
those bytes imply at 2, 3 and 5 tokens per forward, beside one GPU. Stored under `expert_parallel`. `--variants` with
no name times nothing (the bytes alone: a CPU can then size the release's widths).

With `--generate`, whole `generate` calls instead (`--new-tokens` tokens after the prompt, greedy, EOS off), per batch
size and variant (`eager`; `compiled`: `compile=True`, CUDA graphs on CUDA): AR against mask diffusion at a forced 2,
3 and 5 tokens per forward (a threshold no confidence reaches, so the commit floor `ceil(n / steps_left)` sets the
rate: 8, 5 and 3 steps per block of 16), each call's tokens/s, diffusion/AR, the tokens per forward the calls
measured, and what the same variant's step costs predict at that rate. Stored under `<label>_generate`.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from transformers_twotower.defaults_twotower import BLOCK_SIZE


ROOT = Path(__file__).resolve().parent.parent
RELEASE_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # Nemotron-3-Nano-30B-A3B, 52 layers
BLOCK = BLOCK_SIZE  # the release's block
RELEASE_SPEEDUP = 2.42


def synthetic_config(layers: int, experts: int, scale: str):
    from transformers_twotower import TwoTowerConfig

    pattern = RELEASE_PATTERN[:layers]
    if scale == "real":
        widths = dict(
            vocab_size=131072, hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
            mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, chunk_size=128,
            moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, num_experts_per_tok=6,
        )  # fmt: skip
    else:
        widths = dict(
            vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16,
            moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, num_experts_per_tok=2,
        )  # fmt: skip
    return TwoTowerConfig(
        hybrid_override_pattern=pattern, n_routed_experts=experts, routed_scaling_factor=2.5, n_group=1,
        topk_group=1, time_step_limit=(0.0, float("inf")), **widths,
    )  # fmt: skip


def synthetic_model(layers: int, experts: int, scale: str, device: str, dtype: torch.dtype, one_expert_set=False):
    """Random weights built directly in `dtype` on `device` (never materialised in fp32). With `one_expert_set`, every
    MoE layer of both towers holds the same expert tensors (each layer keeps its own router): the release's widths
    then fit a CPU's memory for counting bytes (which counts every layer's selected experts), not for timing."""
    from transformers_twotower import TwoTowerForDiffusionLM

    config = synthetic_config(layers, experts, scale)
    if not one_expert_set:
        with torch.device(device):
            model = TwoTowerForDiffusionLM._from_config(config, dtype=dtype)
    else:
        with torch.device("meta"):
            model = TwoTowerForDiffusionLM._from_config(config, dtype=dtype)
        towers = (model.context_tower, model.denoiser_tower)
        moe = [layer.mixer.experts for tower in towers for layer in tower.layers if layer.block_type == "moe"]
        for experts_module in moe[1:]:
            experts_module.up_proj, experts_module.down_proj = moe[0].up_proj, moe[0].down_proj
        made = {}  # one tensor on `device` per distinct meta parameter, so the shared experts stay shared
        for module in model.modules():
            for name, parameter in list(module.named_parameters(recurse=False)):
                if id(parameter) not in made:
                    made[id(parameter)] = torch.nn.Parameter(torch.empty_like(parameter, device=device))
                setattr(module, name, made[id(parameter)])
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, torch.empty_like(buffer, device=device))
        with torch.no_grad():
            for tower in towers:
                tower.apply(tower._init_weights)
            model.lm_head.weight.normal_(std=config.initializer_range)
    with torch.no_grad():  # routers that spread tokens over the experts, as trained ones do
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                parameter.normal_(std=parameter.shape[1] ** -0.5)
    return model.eval()


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy, median of 5."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        synchronize(device)
        began = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - began)
    return 2 * source.numel() / statistics.median(times)


class RouterLog:
    """The distinct routed experts the tokens of one call select, per MoE layer (forward hooks on the routers)."""

    def __init__(self, tower):
        self.selected: dict[str, set] = {}
        self.handles = [
            module.register_forward_hook(self._record(name))
            for name, module in tower.named_modules()
            if name.endswith("mixer.gate")
        ]

    def _record(self, name):
        def hook(module, inputs, outputs):
            self.selected.setdefault(name, set()).update(outputs[2].flatten().tolist())

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_bytes(tower, head, run, tokens: int, state, reads_context: int, writes_states: bool) -> dict:
    """What one call of `run` must read: the tower's weights (routed experts: the distinct ones selected; the
    embeddings: only the rows looked up), the head, the K/V of `reads_context` positions, the Mamba states."""
    log = RouterLog(tower)
    with torch.no_grad():
        run()
    log.close()
    dense = [
        p for n, p in tower.named_parameters()
        if ".experts." not in n and not n.startswith(("embeddings.", "lm_head."))
    ]  # fmt: skip
    weights = tensor_bytes(dense) + tensor_bytes([head.weight])
    embedding = tower.embeddings.weight
    weights += tokens * embedding.shape[1] * embedding.element_size()
    experts = 0
    distinct, selected = [], []
    for name, chosen in log.selected.items():
        module = tower.get_submodule(name.removesuffix(".gate") + ".experts")
        per_expert = tensor_bytes([module.up_proj[0], module.down_proj[0]])
        experts += len(chosen) * per_expert
        distinct.append(len(chosen))
        selected.append((sorted(chosen), per_expert, module.up_proj.shape[0]))
    batch = state.key_real.shape[0]
    kv = sum(2 * batch * k.shape[1] * reads_context * k.shape[3] * k.element_size() for k in state.keys.values())
    mamba = tensor_bytes([*state.conv.values(), *state.ssm.values()]) * (2 if writes_states else 1)
    return {
        "bytes": weights + experts + kv + mamba,
        "weight_bytes": weights + experts,
        "distinct_experts_per_moe_layer": round(statistics.mean(distinct), 1) if distinct else 0,
        "_selected": selected,  # per MoE layer: (expert ids, bytes per expert, experts); dropped before storing
        "_head": tensor_bytes([head.weight]),
    }


def expert_parallel_bytes(step: dict, ranks: int) -> dict:
    """What the busiest of `ranks` GPUs reads for `step` under expert parallelism: the routed experts split in
    contiguous ranges of `experts / ranks` (transformers' `grouped_gemm` shards the stacked experts along their first
    dimension), each rank reading the selected experts it holds; everything else (attention, Mamba, the shared
    expert, routers, norms, embedding rows, head, K/V, Mamba states) replicated. The ranks meet at every MoE layer
    (the tokens' outputs are summed across them), so a step costs the busiest rank's share, layer by layer."""
    replicated = step["bytes"] - sum(len(chosen) * per_expert for chosen, per_expert, _ in step["_selected"])
    busiest, most = replicated, []
    for chosen, per_expert, experts in step["_selected"]:
        if experts % ranks:
            raise SystemExit(f"error: --ep-size {ranks} does not divide the {experts} experts")
        per_rank = [0] * ranks
        for expert in chosen:
            per_rank[expert // (experts // ranks)] += 1
        busiest += max(per_rank) * per_expert
        most.append(max(per_rank))
    return {
        "busiest_rank_bytes": busiest,
        "busiest_rank_experts_per_moe_layer": round(statistics.mean(most), 1) if most else 0,
    }


def tensor_parallel_bytes(step: dict, ranks: int) -> int:
    """What each of `ranks` GPUs reads for `step` under tensor parallelism: a `1 / ranks` slice of every selected
    expert and of the head (vocabulary columns), everything else replicated (as under `expert_parallel_bytes`)."""
    experts = sum(len(chosen) * per_expert for chosen, per_expert, _ in step["_selected"])
    replicated = step["bytes"] - experts - step["_head"]
    return replicated + (experts + step["_head"]) // ranks


STEPS = ("ar_step", "denoise_masked", "denoise_half", "extend_block")


def speedup_from_costs(cost: dict, tokens_per_forward: float) -> float:
    """Diffusion over AR throughput at `tokens_per_forward`, from each step's cost (its time, or its bytes if every
    step ran at its memory floor): a block of 16 costs 16 AR steps, or 16 / k denoiser steps (the mean of the
    all-masked and half-filled ones) and one extension."""
    denoise = (cost["denoise_masked"] + cost["denoise_half"]) / 2
    return round(BLOCK * cost["ar_step"] / (BLOCK / tokens_per_forward * denoise + cost["extend_block"]), 2)


def speedups_from_costs(cost: dict) -> dict:
    return {f"{k}_tokens_per_forward": speedup_from_costs(cost, k) for k in (2, 3, 5)}


def step_times(entry: dict, variant: str) -> dict | None:
    """Each step's measured time for `variant`, or None where a step was not measured."""
    key = f"{variant}_ms"
    return {name: entry[name][key] for name in STEPS} if all(key in entry[name] for name in STEPS) else None


def expert_parallel_report(batches: dict, ep_sizes) -> dict:
    """Per batch size, one GPU beside each `--ep-size`: the bytes the busiest GPU reads per step, the half-filled
    denoiser step over the AR step, and the diffusion/AR those bytes imply (`speedups_from_costs`)."""
    report = {}
    for batch, entry in batches.items():
        rows = {}
        for ranks in (1, *ep_sizes):
            split = {name: expert_parallel_bytes(entry[name], ranks) for name in STEPS}
            cost = {name: split[name]["busiest_rank_bytes"] for name in STEPS}
            tp = {name: tensor_parallel_bytes(entry[name], ranks) for name in STEPS}
            rows[f"ep_{ranks}"] = {
                "steps": split,
                "denoise_half_over_ar": round(cost["denoise_half"] / cost["ar_step"], 2),
                "implied_speedup_by_bytes": speedups_from_costs(cost),
                "tensor_parallel": {
                    "bytes_per_rank": tp,
                    "denoise_half_over_ar": round(tp["denoise_half"] / tp["ar_step"], 2),
                    "implied_speedup_by_bytes": speedups_from_costs(tp),
                },
            }
        report[batch] = rows
    return report


def timed(fn, device: str, repeats: int, calls: int) -> float:
    """Median over `repeats` of the mean time of `calls` calls, in ms: synchronised wall time on a GPU, process CPU
    time on a CPU (steadier on a shared machine; with one thread it is the step's compute)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = clock()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((clock() - began) / calls)
    return statistics.median(times) * 1e3


def cuda_graph(fn):
    """`fn` captured once into a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_functions(model, state, batch: int, compiled: bool):
    """The four steps on `state`, each leaving its length as it found it (a context step's K/V and Mamba writes stay:
    the next call overwrites the same positions)."""
    from transformers import CompileConfig

    device = state.length.device
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    steps = model.decode_steps(CompileConfig(mode=mode) if compiled else None)
    mask_id = model.config.mask_token_id
    generator = torch.Generator().manual_seed(0)
    block = torch.randint(4, model.config.vocab_size, (batch, BLOCK), generator=generator).to(device)
    masked = torch.full_like(block, mask_id)
    half = block.clone()
    half[:, ::2] = mask_id
    one, halfway = torch.ones(batch, device=device), torch.full((batch,), 0.5, device=device)
    token = block[:, :1].contiguous()

    def context(tokens):
        def run():
            steps.extend(state, tokens)
            state.length.sub_(tokens.shape[1])
            state.num_written -= tokens.shape[1]

        return run

    return {
        "ar_step": (context(token), 1),
        "denoise_masked": (lambda: steps.denoise(state, masked, one), BLOCK),
        "denoise_half": (lambda: steps.denoise(state, half, halfway), BLOCK),
        "extend_block": (context(block), BLOCK),
    }


def measure(model, batch_sizes, variants, prompt_length: int, repeats: int, bandwidth: float) -> dict:
    device = str(model.device)
    results = {}
    for batch in batch_sizes:
        prompt = torch.randint(4, model.config.vocab_size, (batch, prompt_length), device=model.device)
        state = model.prefill(prompt, keep_behind=False, max_length=prompt_length + 2 * BLOCK)
        eager = step_functions(model, state, batch, compiled=False)
        entry = {}
        for name, (fn, tokens) in eager.items():
            context_tower = name in ("ar_step", "extend_block")
            tower = model.context_tower if context_tower else model.denoiser_tower
            head = model.context_tower.lm_head if context_tower else model.lm_head
            reads = prompt_length + (tokens if context_tower else BLOCK)
            entry[name] = step_bytes(tower, head, fn, tokens * batch, state, reads, context_tower)
            entry[name]["floor_ms"] = round(entry[name]["bytes"] / bandwidth * 1e3, 4)
        for variant in variants:
            began = time.perf_counter()
            try:
                with torch.no_grad():
                    functions = step_functions(model, state, batch, compiled=variant == "compiled")
                    if variant == "cuda_graph":
                        functions = {name: (cuda_graph(fn), tokens) for name, (fn, tokens) in functions.items()}
                    for fn, _ in functions.values():  # warm-up (compiles and records here)
                        for _ in range(3):
                            fn()
                    setup = time.perf_counter() - began
                    for name, (fn, _) in functions.items():
                        ms = timed(fn, device, repeats, calls=5)
                        entry[name][f"{variant}_ms"] = round(ms, 3)
                        entry[name][f"{variant}_over_floor"] = round(ms / entry[name]["floor_ms"], 2)
                entry.setdefault("setup_seconds", {})[variant] = round(setup, 1)
            except Exception as error:  # one variant failing (a kernel, a compiler) leaves the others' figures
                entry.setdefault("errors", {})[variant] = f"{type(error).__name__}: {error}"[:2000]
        entry["implied_speedup"] = implied_speedups(entry, variants)
        results[f"batch_{batch}"] = entry
    return results


FORCED_STEPS = {2: 8, 3: 5, 5: 3}  # tokens per forward -> steps per block of 16 (16 / k, rounded)


def generate_calls(model, prompt, new_tokens: int, compiled: bool) -> dict:
    """`generate` calls: AR, and mask diffusion at each forced rate (a threshold above 1 commits the floor only)."""
    common = dict(max_new_tokens=new_tokens, eos_token_id=None, do_sample=False, return_dict_in_generate=True,
                  compile=compiled)  # fmt: skip
    calls = {"ar": lambda: model.generate(prompt, generation_mode="ar", **common)}
    for k, steps in FORCED_STEPS.items():
        calls[f"diffusion_{k}"] = lambda steps=steps: model.generate(
            prompt, generation_mode="mask_diffusion", block_size=BLOCK, steps_per_block=steps,
            confidence_threshold=1.5, **common,
        )  # fmt: skip
    return calls


def measure_generate(model, batch_sizes, variants, prompt_length: int, new_tokens: int, repeats: int) -> dict:
    """Whole `generate` calls, alternated `repeats` times after a warm-up (which compiles); the median per call."""
    device = str(model.device)
    results = {}
    for batch in batch_sizes:
        prompt = torch.randint(4, model.config.vocab_size, (batch, prompt_length), device=model.device)
        entry = {}
        for variant in [v for v in variants if v in ("eager", "compiled")]:  # generate has no hand-captured graph
            began = time.perf_counter()
            try:
                calls = generate_calls(model, prompt, new_tokens, compiled=variant == "compiled")
                outputs = {name: call() for name, call in calls.items()}  # warm-up (compiles here)
                setup = time.perf_counter() - began
                times = {name: [] for name in calls}
                for _ in range(repeats):
                    for name, call in calls.items():
                        times[name].append(timed(call, device, repeats=1, calls=1) / 1e3)
            except Exception as error:  # one variant failing leaves the others' figures
                entry.setdefault("errors", {})[variant] = f"{type(error).__name__}: {error}"[:2000]
                continue
            seconds = {name: statistics.median(values) for name, values in times.items()}
            tokens_per_second = {name: batch * new_tokens / value for name, value in seconds.items()}
            entry[variant] = {
                "setup_seconds": round(setup, 1),
                "tokens_per_second": {name: round(value, 1) for name, value in tokens_per_second.items()},
                "diffusion_over_ar": {
                    name: round(value / tokens_per_second["ar"], 2)
                    for name, value in tokens_per_second.items()
                    if name != "ar"
                },  # fmt: skip
                "tokens_per_forward": {
                    name: round(float(out.tokens_per_forward.float().mean()), 2)
                    for name, out in outputs.items()
                    if name != "ar"
                },  # fmt: skip
            }
        results[f"batch_{batch}"] = entry
    return results


def predicted_speedups(step_entry: dict, variant: str, rates: dict) -> dict:
    """Diffusion/AR that the step costs imply at the measured tokens per forward (`speedup_from_costs`)."""
    times = step_times(step_entry, variant)
    return {name: speedup_from_costs(times, k) for name, k in rates.items()} if times else {}


def implied_speedups(entry: dict, variants) -> dict:
    """`speedups_from_costs` on each variant's measured step times."""
    return {variant: speedups_from_costs(times) for variant in variants if (times := step_times(entry, variant))}


def print_table(result: dict, variants):
    print(f"\n{result['model']} on {result['device']}, bandwidth {result['bandwidth_gb_s']} GB/s")
    for batch, entry in result["batches"].items():
        print(f"{batch}:")
        print(
            f"  {'step':>15} {'MB read':>9} {'experts':>8} {'floor ms':>9} " + " ".join(f"{v:>18}" for v in variants)
        )
        for name in STEPS:
            row = entry[name]
            cells = [
                f"{row[f'{v}_ms']:8.3f} ({row[f'{v}_over_floor']:5.1f}x)" if f"{v}_ms" in row else f"{'-':>18}"
                for v in variants
            ]
            print(
                f"  {name:>15} {row['bytes'] / 1e6:9.1f} {row['distinct_experts_per_moe_layer']:8} "
                f"{row['floor_ms']:9.3f} " + " ".join(f"{c:>18}" for c in cells)
            )
        for variant, speedups in entry["implied_speedup"].items():
            print(f"  implied diffusion/AR ({variant}): {speedups} (release: {RELEASE_SPEEDUP}x)")
        for variant, error in entry.get("errors", {}).items():
            print(f"  {variant} failed: {error.splitlines()[0][:200]}")


def model_name(folder: str | Path) -> str:
    """How a result names a model folder, never by an absolute path: "demo" for the bundled demo, the path relative
    to the repository for a folder inside it, else the folder's own name."""
    folder = Path(folder).resolve()
    if folder == (ROOT / "src/transformers_twotower/demo").resolve():
        return "demo"
    return str(folder.relative_to(ROOT.resolve())) if folder.is_relative_to(ROOT.resolve()) else folder.name


def package_versions() -> dict:
    """The versions of the packages that decide which kernels run (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transformers", "mamba-ssm", "causal-conv1d", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def store(result: dict, device: str, label: str) -> Path:
    path = ROOT / f"benchmarks/results/step_costs_{device.split(':')[0]}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored[label] = result
    path.write_text(json.dumps(stored, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformers_twotower bench --synthetic", description=__doc__)
    parser.add_argument("--synthetic", action="store_true", help="(how `bench` dispatches here)")
    parser.add_argument("--layers", type=int, default=26, help="a prefix of the release's 52-layer pattern")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--scale", choices=["real", "small"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants", nargs="*", choices=["eager", "cuda_graph", "compiled"], help="none: bytes only, no timing"
    )
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label", help="default: synthetic_<scale>_<layers>_layers")
    parser.add_argument("--generate", action="store_true", help="time whole generate calls (see above)")
    parser.add_argument("--new-tokens", type=int, default=64, help="with --generate: tokens per call")
    parser.add_argument("--no-store", action="store_true", help="print only")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="auto: bf16 on CUDA")
    parser.add_argument(
        "--ep-size", type=int, nargs="+", default=[], metavar="N",
        help="also report, per step, the bytes the busiest of N GPUs reads under expert parallelism (see above)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.ep_size):
        raise SystemExit(f"error: --ep-size must be positive, got {args.ep_size}")
    if not 1 <= args.layers <= len(RELEASE_PATTERN):
        raise SystemExit(f"error: --layers must be in [1, {len(RELEASE_PATTERN)}], got {args.layers}")
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    variants = args.variants
    if variants is None:
        variants = ["eager", "cuda_graph", "compiled"] if on_cuda else ["eager", "compiled"]
    if "cuda_graph" in variants and not on_cuda:
        raise SystemExit("error: the cuda_graph variant needs --device cuda")
    dtype = {
        "auto": torch.bfloat16 if on_cuda else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[args.dtype]
    began = time.perf_counter()
    bytes_only = not variants and not args.generate
    model = synthetic_model(args.layers, args.experts, args.scale, args.device, dtype, one_expert_set=bytes_only)
    parameters = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(args.device, 4096 if on_cuda else 256)
    with torch.no_grad():
        batches = measure(model, args.batch_sizes, variants, args.prompt_length, args.repeats, bandwidth)
    if args.generate:
        generated = measure_generate(
            model, args.batch_sizes, variants, args.prompt_length, args.new_tokens, args.repeats
        )
        for batch, entry in generated.items():
            for variant in variants:
                if variant in entry:
                    entry[variant]["predicted_by_step_costs"] = predicted_speedups(
                        batches[batch], variant, entry[variant]["tokens_per_forward"]
                    )
    expert_parallel = expert_parallel_report(batches, args.ep_size) if args.ep_size else None
    for entry in batches.values():
        for name in STEPS:
            del entry[name]["_selected"], entry[name]["_head"]
    result = {
        "model": f"synthetic {args.scale}: {args.layers} layers, {args.experts} experts, {parameters / 1e9:.2f}B "
        f"parameters, {str(dtype).removeprefix('torch.')}"
        + (", one expert set shared by the MoE layers (bytes only)" if bytes_only else ""),
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        **package_versions(),
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_length,
        "repeats": args.repeats,
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "batches": batches,
        **({"expert_parallel": expert_parallel} if expert_parallel else {}),
        "seconds": round(time.perf_counter() - began, 1),
    }
    print_table(result, variants)
    if expert_parallel:
        print_expert_parallel_table(expert_parallel)
    label = args.label or f"synthetic_{args.scale}_{args.layers}_layers"
    if args.generate:
        generate_result = {**{k: v for k, v in result.items() if k != "batches"}, "new_tokens": args.new_tokens,
                           "batches": generated}  # fmt: skip
        print_generate_table(generate_result)
        if not args.no_store:
            print(f"wrote {store(generate_result, args.device, label + '_generate')}")
    if not args.no_store:
        print(f"wrote {store(result, args.device, label)}")
    return 0


def print_expert_parallel_table(report: dict):
    print("\nexpert parallelism, by bytes: what the busiest GPU reads per step (MB), experts it reads per MoE layer")
    for batch, rows in report.items():
        print(f"{batch}:")
        print(
            f"  {'GPUs':>6} " + " ".join(f"{name:>20}" for name in rows["ep_1"]["steps"]) + "  half/AR  diffusion/AR"
        )
        for ranks, row in rows.items():
            cells = [
                f"{step['busiest_rank_bytes'] / 1e6:10.1f} ({step['busiest_rank_experts_per_moe_layer']:5.1f})"
                for step in row["steps"].values()
            ]
            implied = "  ".join(f"{v:4.2f}" for v in row["implied_speedup_by_bytes"].values())
            print(f"  {ranks.removeprefix('ep_'):>6} " + " ".join(f"{c:>20}" for c in cells)
                  + f"  {row['denoise_half_over_ar']:6.2f}x  {implied} (2/3/5 tokens per forward)")  # fmt: skip
        print("  tensor parallelism over the same GPUs, for comparison (MB per GPU):")
        for ranks, row in list(rows.items())[1:]:
            tp = row["tensor_parallel"]
            cells = [f"{value / 1e6:10.1f}" for value in tp["bytes_per_rank"].values()]
            implied = "  ".join(f"{v:4.2f}" for v in tp["implied_speedup_by_bytes"].values())
            print(f"  {ranks.removeprefix('ep_'):>6} " + " ".join(f"{c:>20}" for c in cells)
                  + f"  {tp['denoise_half_over_ar']:6.2f}x  {implied}")  # fmt: skip


def print_generate_table(result: dict):
    print(f"\nwhole generate calls, {result['new_tokens']} new tokens after {result['prompt_tokens']}:")
    for batch, entry in result["batches"].items():
        for variant, row in entry.items():
            if variant == "errors":
                for name, error in row.items():
                    print(f"  {batch} {name} failed: {error.splitlines()[0][:200]}")
                continue
            speeds = ", ".join(f"{name} {value} tok/s" for name, value in row["tokens_per_second"].items())
            print(f"  {batch} {variant}: {speeds}")
            for name, ratio in row["diffusion_over_ar"].items():
                predicted = row.get("predicted_by_step_costs", {}).get(name, "-")
                print(
                    f"    {name}: {ratio}x AR at {row['tokens_per_forward'][name]} tokens/forward "
                    f"(step costs predict {predicted}x)"
                )


if __name__ == "__main__":
    raise SystemExit(main())
