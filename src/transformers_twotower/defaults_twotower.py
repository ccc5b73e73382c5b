"""TwoTower's defaults, written once: the configuration, the generation config, the command line and the converters
read them from here.

The model's values are the release's (docs/architecture.md): blocks of 16 tokens, mask id 3. The generation values are
the published operating point: at most 16 denoiser steps per block, confidence threshold 0.8.
"""

GENERATION_MODES = ("mask_diffusion", "mock_ar", "ar")

# The model's diffusion fields (`TwoTowerConfig`).
MASK_TOKEN_ID = 3
BLOCK_SIZE = 16

# TwoTower's own generation fields (`TwoTowerGenerationConfig`), and the values `generate` uses where neither the
# caller nor the model's generation config sets them.
TWOTOWER_GENERATION_DEFAULTS = {
    "generation_mode": "mask_diffusion",
    "block_size": BLOCK_SIZE,
    "steps_per_block": 16,
    "confidence_threshold": 0.8,
    "mask_token_id": MASK_TOKEN_ID,
    "output_history": False,
    "keep_eos_block": False,
    "compile": False,
}
# A model's generation defaults: TwoTower's, 128 new tokens, greedy.
MODEL_GENERATION_DEFAULTS = {**TWOTOWER_GENERATION_DEFAULTS, "max_new_tokens": 128, "do_sample": False}

# The release's `generate_mask_diffusion` function's own defaults: it commits at a stricter threshold than the
# published operating point.
RELEASE_FUNCTION_DEFAULTS = {
    "block_size": BLOCK_SIZE,
    "steps_per_block": TWOTOWER_GENERATION_DEFAULTS["steps_per_block"],
    "mask_token_id": MASK_TOKEN_ID,
    "confidence_threshold": 0.9,
}
