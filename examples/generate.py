"""Generate with all three modes and report what each cost.

    python examples/generate.py [checkpoint_dir]

Without an argument it uses the tiny random checkpoint the tests use: the tokens are meaningless, but the mechanics
(NFE, tokens per forward, batching) are real.
"""

import sys
from pathlib import Path

import torch

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.defaults_twotower import GENERATION_MODES


checkpoint = (
    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "modeling_tests/fixtures/twotower_tiny_a"
)
model = TwoTowerForDiffusionLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

# Two prompts of different lengths, left-padded.
prompts = [[1, 37, 412, 95, 260, 18, 333, 71, 129, 455, 204, 88], [1, 290]]
width = max(map(len, prompts))
input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

for mode in GENERATION_MODES:
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        generation_mode=mode,
        max_new_tokens=32,
        block_size=8,
        steps_per_block=8,
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    print(
        f"{mode:>14}: nfe={out.nfe.tolist()} tokens/forward={[round(x, 2) for x in out.tokens_per_forward.tolist()]}"
    )
    for row in out.sequences[:, width:].tolist():
        print(f"{'':>16}{row}")
