"""Load a TwoTower checkpoint and fill one block by mask diffusion with the model's building blocks.

    python examples/quickstart.py [checkpoint_dir]

Without an argument it loads the tiny random checkpoint the tests use (its text is meaningless; only the mechanics
show). The full loop, batched and with every knob, is `model.generate` (docs/generation.md).
"""

import sys
from pathlib import Path

import torch

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.sampling_twotower import commit_mask, predict_tokens


checkpoint = (
    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "modeling_tests/fixtures/twotower_tiny_a"
)
model = TwoTowerForDiffusionLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
config = model.config
prompt = torch.tensor([[1, 37, 412, 95, 260, 18, 333, 71, 129, 455, 204, 88]])
block_size, threshold = 4, 0.8

with torch.no_grad():
    state = model.prefill(prompt)  # context tower over the prompt: K/V and Mamba states per layer
    print(f"context tower's next token (AR): {state.next_token_logits.argmax(-1).item()}")

    block = torch.full((1, block_size), config.mask_token_id)
    for step in range(block_size):
        masked = block == config.mask_token_id
        if not masked.any():
            break
        t = masked.float().mean(-1)  # the fraction still masked
        logits = model.denoise_step(block, state, t)  # (1, block_size, vocab)
        prediction, confidence, _ = predict_tokens(logits, config.mask_token_id)
        commit = commit_mask(confidence, masked, step, block_size, threshold)
        block = torch.where(commit, prediction, block)
        print(f"step {step}: t={t.item():.2f} block={block[0].tolist()}")

    model.extend_context(state, block)  # the context tower reads the committed block once
    print(f"context now holds {state.num_written} tokens")
