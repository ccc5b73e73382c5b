"""A plain Nemotron-H autoregressive checkpoint -> a TwoTower ready for denoiser training.

    python conversion/convert_nemotron_h_to_twotower.py --input NEMOTRON_H_DIR --output OUT_DIR [--mask-token-id 3]
        [--block-size 16] [--dtype auto|bfloat16|float32] [--max-shard-size 5GB] [--overwrite]

Both towers start as copies of the backbone (`backbone.*` or `model.*` -> `context_tower.*` and `denoiser_tower.*`;
`lm_head` -> `context_lm_head` and `lm_head`). The time conditioning starts as the identity: `t_block`'s output layer
is zero, so `t_emb = 0` for every `t`, and every `scale_shift_tables[i]` is `(shift 0, scale 0, gate 1)`, so
`modulate(h) = h` and the gate is 1. The untrained denoiser is then exactly the backbone run with the denoiser's
changes (joint attention, seeded Mamba): in Mock-AR it predicts the backbone's next-token logits, and its output does
not depend on `t` until training moves `t_block` (the adaLN-Zero start of DiT). `t_embedder` gets a normal random
initialisation so that gradients reach it once `t_block` moves.

Streams shard by shard, writes atomically, reads safetensors only (see `checkpoint_io`).
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from checkpoint_io import (
    MAX_SHARD_SIZE,
    add_output_arguments,
    atomic_output_dir,
    convert_tensors,
    load_config,
    resolve_dtype,
    run_conversion,
    saved_tensor_shapes,
    write_model_files,
)

from transformers_twotower import TwoTowerConfig, TwoTowerGenerationConfig
from transformers_twotower.card_twotower import model_card as package_model_card
from transformers_twotower.defaults_twotower import BLOCK_SIZE, MASK_TOKEN_ID
from transformers_twotower.layout_twotower import SCALE_SHIFT_TABLES, T_BLOCK, T_EMBEDDER, backbone_to_towers


def time_conditioning(config: TwoTowerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Identity adaLN-single: zero `t_block` output, tables (shift 0, scale 0, gate 1); random `t_embedder`."""
    generator = torch.Generator().manual_seed(seed)
    hidden, freq = config.hidden_size, config.time_embedding_size
    std = config.initializer_range
    tensors = {
        f"{T_EMBEDDER}.mlp.0.weight": torch.randn(hidden, freq, generator=generator) * std,
        f"{T_EMBEDDER}.mlp.0.bias": torch.zeros(hidden),
        f"{T_EMBEDDER}.mlp.2.weight": torch.randn(hidden, hidden, generator=generator) * std,
        f"{T_EMBEDDER}.mlp.2.bias": torch.zeros(hidden),
        f"{T_BLOCK}.1.weight": torch.zeros(3 * hidden, hidden),
        f"{T_BLOCK}.1.bias": torch.zeros(3 * hidden),
    }
    identity = torch.stack([torch.zeros(hidden), torch.zeros(hidden), torch.ones(hidden)])  # shift, scale, gate
    for i in range(config.num_hidden_layers):
        tensors[f"{SCALE_SHIFT_TABLES}.{i}"] = identity.clone()
    return tensors


def convert_nemotron_h_to_twotower(
    input_dir,
    output_dir,
    mask_token_id: int = MASK_TOKEN_ID,
    block_size: int = BLOCK_SIZE,
    dtype: str = "auto",
    max_shard_size: str | int = MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    target_dtype = resolve_dtype(dtype)
    config = load_config(input_dir)
    config.mask_token_id, config.block_size = mask_token_id, block_size
    config._check_twotower_fields()

    with atomic_output_dir(output_dir, overwrite) as work:
        expected = saved_tensor_shapes(config)
        new_tensors = time_conditioning(config)
        convert_tensors(input_dir, work, backbone_to_towers, expected, target_dtype, max_shard_size, str(input_dir),
                        new_tensors)  # fmt: skip
        write_model_files(work, config, input_dir, untrained_card(config, input_dir), target_dtype)
    return output_dir


def untrained_card(config: TwoTowerConfig, source: Path) -> str:
    parameters = sum(math.prod(shape) for shape, _ in saved_tensor_shapes(config).values())
    description = f"""Made by `conversion/convert_nemotron_h_to_twotower.py` of `transformers-twotower`: both towers are
copies of the Nemotron-H backbone ({parameters / 1e9:.2f}B parameters in all) and the time conditioning starts as the
identity. **The denoiser is not trained**: train it with `model(input_ids, labels=labels).loss` (block-wise masked
diffusion, block {config.block_size}, mask id {config.mask_token_id}) before generating with
`generation_mode="mask_diffusion"`. `generation_mode="ar"` gives the backbone's own generations. The license is the
source checkpoint's."""
    card = package_model_card(
        config, TwoTowerGenerationConfig.from_model_config(config),
        title=f"TwoTower initialised from `{source.name}` (denoiser not trained)", description=description,
    )  # fmt: skip
    return str(card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", required=True, help="Nemotron-H checkpoint folder (transformers' nemotron_h layout)"
    )
    parser.add_argument("--mask-token-id", type=int, default=MASK_TOKEN_ID)
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    return run_conversion(
        lambda: convert_nemotron_h_to_twotower(
            args.input,
            args.output,
            args.mask_token_id,
            args.block_size,
            args.dtype,
            args.max_shard_size,
            args.overwrite,
        )  # fmt: skip
    )


if __name__ == "__main__":
    sys.exit(main())
