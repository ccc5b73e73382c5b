"""Memory per GPU for the release split over several GPUs, by arithmetic on its sizes (docs/generation.md, "Several
GPUs").

    python benchmarks/parallel_memory.py [--gpus 1 2 4 8] [--tokens 4096] [--lora-rank 16]

The release's widths and 52 layers (`bench_steps.synthetic_config`), built on the meta device, parameters counted by
what each plan (`parallel_twotower`) does with them:

- routed experts: split over the GPUs by every plan (by slices under `tp`, whole experts under `ep` and `tp+ep`);
- embeddings and heads (4 vocabulary matrices): split under `tp` and `tp+ep`, whole on every GPU under `ep`;
- everything else (attention, Mamba, shared experts, routers, norms, time conditioning): whole on every GPU.

Per GPU, in bf16:

- inference: the weights, plus the decode state of one `--tokens`-token row (K/V and Mamba states, with the copies
  Mock-AR keeps one token behind);
- LoRA training on one `--tokens`-token sequence: the weights, the adapters (PEFT's default targets on the denoiser,
  rank `--lora-rank`, fp32 weights, gradients and two Adam moments), and the activations every GPU holds (tensor and
  expert parallelism split weights, not tokens): what the context tower keeps for the denoiser (all K/V, a Mamba
  state at every block start), one hidden state per denoiser layer (gradient checkpointing), the working set of
  recomputing one MoE layer, and the fp32 logits with their gradient.

Writes `benchmarks/results/parallel_memory.json` and prints the table.
"""

import argparse
import json
import re
from pathlib import Path

import torch
from bench_steps import RELEASE_PATTERN, synthetic_config

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.defaults_twotower import BLOCK_SIZE
from transformers_twotower.modeling_twotower import DENOISER_LORA_TARGETS
from transformers_twotower.parallel_twotower import DENSE_TP_MODULES, PLANS


ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def parameter_groups(model) -> dict[str, int]:
    """Parameters of both towers by how the plans treat them: routed experts, vocabulary matrices, the rest."""
    vocabulary = {f"{name}.weight" for name in DENSE_TP_MODULES}
    groups = {"experts": 0, "vocabulary": 0, "replicated": 0}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        group = "experts" if ".mixer.experts." in name else "vocabulary" if name in vocabulary else "replicated"
        groups[group] += parameter.numel()
    return groups


def lora_parameters(model, rank: int) -> int:
    """Adapter parameters for PEFT's default TwoTower targets: `rank * (in + out)` per targeted linear layer."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(DENOISER_LORA_TARGETS, name)
    )


def decode_state_bytes(config, tokens: int) -> int:
    """One row's decode state: K/V over `tokens` + a block per attention layer (bf16), and per Mamba layer the conv
    window (bf16) and the SSM state (fp32), each twice (the copies kept one token behind)."""
    attention = config.layers_block_type.count("full_attention")
    mamba = config.layers_block_type.count("linear_attention")
    kv = attention * 2 * config.num_key_value_heads * config.head_dim * (tokens + BLOCK_SIZE) * 2
    conv_dim = config.mamba_num_heads * config.mamba_head_dim + 2 * config.n_groups * config.ssm_state_size
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
    return kv + mamba * 2 * (conv_dim * config.conv_kernel * 2 + ssm)


def training_activation_bytes(config, tokens: int) -> dict[str, int]:
    """What one `tokens`-token training sequence keeps at the peak of its backward (see the module docstring)."""
    attention = config.layers_block_type.count("full_attention")
    mamba = config.layers_block_type.count("linear_attention")
    layers = len(config.layers_block_type)
    conv_dim = config.mamba_num_heads * config.mamba_head_dim + 2 * config.n_groups * config.ssm_state_size
    block_starts = tokens // BLOCK_SIZE
    context = attention * 2 * config.num_key_value_heads * config.head_dim * tokens * 2 + mamba * block_starts * (
        conv_dim * (config.conv_kernel - 1) * 2
        + config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
    )
    checkpoints = layers * tokens * config.hidden_size * 2
    routed = tokens * config.num_experts_per_tok
    moe_layer = routed * (2 * config.hidden_size + 2 * config.moe_intermediate_size) * 2  # in, out, up, act (bf16)
    logits = 2 * tokens * config.vocab_size * 4  # fp32 logits and their gradient
    return {"context_tower_kept": context, "denoiser_checkpoints": checkpoints, "moe_recompute": moe_layer,
            "logits": logits}  # fmt: skip


def per_gpu(groups: dict, plan: str, gpus: int) -> int:
    """bf16 weight bytes on one of `gpus` GPUs under `plan` (one GPU: everything)."""
    vocabulary_split = gpus if plan in ("tp", "tp+ep") else 1
    return 2 * (groups["experts"] // gpus + groups["vocabulary"] // vocabulary_split + groups["replicated"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-store", action="store_true")
    args = parser.parse_args(argv)
    config = synthetic_config(len(RELEASE_PATTERN), 128, "real")
    with torch.device("meta"):
        model = TwoTowerForDiffusionLM(config)
    groups = parameter_groups(model)
    state = decode_state_bytes(config, args.tokens)
    lora = lora_parameters(model, args.lora_rank)
    activations = training_activation_bytes(config, args.tokens)
    rows = []
    for plan in PLANS:
        for gpus in args.gpus:
            if gpus == 1 and plan != PLANS[0]:
                continue
            weights = per_gpu(groups, plan, gpus)
            inference = weights + state
            training = weights + lora * 16 + sum(activations.values())
            rows.append({"plan": plan if gpus > 1 else "one GPU", "gpus": gpus, "weights_gb": round(weights / GB, 1),
                         "inference_gb": round(inference / GB, 1), "lora_training_gb": round(training / GB, 1)})  # fmt: skip
    result = {
        "model": "the release's widths, 52 layers, 128 experts, bf16 (meta device)",
        "parameters_billion": {name: round(count / 1e9, 2) for name, count in groups.items()},
        "decode_state_gb_per_row": round(state / GB, 3),
        "lora": {"rank": args.lora_rank, "parameters_million": round(lora / 1e6, 1)},
        "training_activations_gb": {name: round(value / GB, 2) for name, value in activations.items()},
        "tokens": args.tokens,
        "rows": rows,
    }
    print(f"parameters (billions, both towers): {result['parameters_billion']}")
    print(f"activations per training sequence of {args.tokens} tokens (GB): {result['training_activations_gb']}")
    print(f"{'plan':>8} {'GPUs':>5} {'weights GB':>11} {'inference GB':>13} {'LoRA training GB':>17}")
    for row in rows:
        print(f"{row['plan']:>8} {row['gpus']:>5} {row['weights_gb']:>11} {row['inference_gb']:>13} "
              f"{row['lora_training_gb']:>17}")  # fmt: skip
    if not args.no_store:
        path = ROOT / "benchmarks/results/parallel_memory.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
