import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers_twotower import TwoTowerConfig, TwoTowerForDiffusionLM  # noqa: E402
from transformers_twotower.loading_twotower import DEMO_MODEL  # noqa: E402


RELEASE_FIXTURE = Path(__file__).parent / "fixtures" / "twotower_tiny_a"
# What NVIDIA's code recorded on the release fixture (fixtures/twotower_tiny_a/README.txt): prompts, token ids, NFE.
EXPECTED = json.loads((RELEASE_FIXTURE / "expected.json").read_text())
EXPECTED_PROMPTS = EXPECTED["prompts"]
RELEASE_ATOL = EXPECTED["suggested_tolerance"]["logits_atol"]  # 5e-4 on the recorded logits (fp32)
# The fixture records every step's logits for three of its twelve diffusion runs (the `main` prompt below threshold
# 1); the others are checked by their tokens, NFE and the block before every step.
with safe_open(RELEASE_FIXTURE / "expected.safetensors", "pt") as recorded:
    STEP_LOGITS_RECORDED = sorted(
        name.removeprefix("diffusion/").removesuffix("/step_logits")
        for name in recorded.keys()
        if name.startswith("diffusion/") and name.endswith("/step_logits")
    )
assert len(STEP_LOGITS_RECORDED) == 3, STEP_LOGITS_RECORDED  # the step tests must not parametrize over nothing

# A short run of `generate` on the tiny models: two blocks of 4 tokens, no EOS.
GENERATE = dict(max_new_tokens=8, block_size=4, steps_per_block=4, eos_token_id=None)
# Mask diffusion on the tiny models in blocks of 4, with a threshold low enough that a step often commits several.
DIFFUSION = dict(block_size=4, steps_per_block=4, confidence_threshold=0.3)


def tiny_config(**overrides) -> TwoTowerConfig:
    """A tiny random TwoTower with at least one layer of every type (M, *, E, -)."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        hybrid_override_pattern="M*EM-*ME",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        conv_kernel=4,
        chunk_size=8,
        intermediate_size=48,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        routed_scaling_factor=2.5,
        time_step_limit=(0.0, float("inf")),
        block_size=4,
        mask_token_id=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return TwoTowerConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> TwoTowerForDiffusionLM:
    torch.manual_seed(seed)
    model = TwoTowerForDiffusionLM(tiny_config(**overrides)).eval()
    # Random but not degenerate conditioning, so that tests that compare t values can fail.
    with torch.no_grad():
        for p in model.denoiser_tower.adaln.t_block.parameters():
            p.normal_(std=0.2)
    return model


def load_release(dtype=torch.float32, **kwargs) -> TwoTowerForDiffusionLM:
    """The tiny release-layout checkpoint, in fp32 unless told otherwise, in eval mode."""
    return TwoTowerForDiffusionLM.from_pretrained(RELEASE_FIXTURE, dtype=dtype, **kwargs).eval()


def clean_ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Seeded random ids `(batch, length)` from `model`'s vocabulary, clear of the special ids 0-3 (the mask is 3)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=generator)


def clean_rows(model, lengths, seed: int = 0) -> list[list[int]]:
    """Seeded random token lists of the given lengths, drawn one after another, clear of the special ids."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `(input_ids, attention_mask)`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def denoiser_as_context_copy(model):
    """Give the denoiser the context tower's weights and head. Without time conditioning it then computes what the
    context tower computes: Mock-AR's logits (the last token re-read one token behind) are the AR next-token logits."""
    state = {k: v for k, v in model.context_tower.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = model.denoiser_tower.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("adaln.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.context_tower.lm_head.weight)
    return model


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]  # ids 0..3, as in the release


def word_tokenizer(vocab_size: int):
    """An offline word-level tokenizer: ids 0-3 are the special tokens, id i >= 4 is the word `w{i}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )


def words(ids) -> str:
    return " ".join(SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"w{i}" for i in ids)


@pytest.fixture(scope="session")
def release_model() -> TwoTowerForDiffusionLM:
    """Read-only: a test that changes the model loads its own (`load_release`)."""
    return load_release()


@pytest.fixture(scope="session")
def expected_tensors() -> dict[str, torch.Tensor]:
    return load_file(RELEASE_FIXTURE / "expected.safetensors")


@pytest.fixture(scope="session")
def expected() -> dict:
    return EXPECTED


@pytest.fixture(scope="module")
def demo():
    """The demo model bundled with the package (fp32) and its tokenizer."""
    from transformers import AutoTokenizer

    model = TwoTowerForDiffusionLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture
def model() -> TwoTowerForDiffusionLM:
    return tiny_model()
