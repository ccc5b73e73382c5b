"""Parity with NVIDIA's own TwoTower code, recorded on the tiny release-layout checkpoint (fp32, CPU)."""

import pytest
import torch
from conftest import RELEASE_ATOL, RELEASE_FIXTURE, STEP_LOGITS_RECORDED
from safetensors import safe_open

from transformers_twotower import TwoTowerConfig, TwoTowerForDiffusionLM
from transformers_twotower.sampling_twotower import commit_mask, predict_tokens


PROMPTS = ["main", "len2", "len17"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_release_config_loads_as_is():
    config = TwoTowerConfig.from_pretrained(RELEASE_FIXTURE)
    assert config.model_type == "twotower"
    assert config.hybrid_override_pattern == "MEM*EMEM*E"
    assert config.n_routed_experts == 8 and config.num_experts_per_tok == 2
    assert tuple(config.time_step_limit) == (0.0, float("inf"))
    assert (config.mask_token_id, config.block_size) == (3, 16)
    assert not hasattr(config, "auto_map"), "the release's auto_map names NVIDIA modules that are not shipped"


def test_release_state_dict_loads_without_missing_or_unexpected_keys():
    model, info = TwoTowerForDiffusionLM.from_pretrained(
        RELEASE_FIXTURE, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Experts were stacked like transformers' Nemotron-H does it.
    with safe_open(RELEASE_FIXTURE / "model-00001-of-00002.safetensors", "pt") as f:
        names = set(f.keys())
    name = next(n for n in names if ".mixer.experts.5.up_proj.weight" in n)
    prefix = name.split(".mixer.experts.")[0]
    stacked = model.get_parameter(prefix + ".mixer.experts.up_proj")
    with safe_open(RELEASE_FIXTURE / "model-00001-of-00002.safetensors", "pt") as f:
        torch.testing.assert_close(stacked[5], f.get_tensor(name).float(), rtol=0, atol=0)
    # The frozen context tower stays frozen after loading.
    assert not any(p.requires_grad for p in model.context_tower.parameters())
    assert all(p.requires_grad for p in model.denoiser_tower.parameters())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_context_forward(release_model, expected, expected_tensors, prompt):
    ids = torch.tensor([expected["prompts"][prompt]])
    logits = release_model(ids).logits
    assert max_diff(logits, expected_tensors[f"context_forward/{prompt}/logits"]) < RELEASE_ATOL


@pytest.mark.parametrize("prompt", PROMPTS)
def test_context_prefill_last_logits(release_model, expected, expected_tensors, prompt):
    cache = release_model.prefill(torch.tensor([expected["prompts"][prompt]]))
    assert max_diff(cache.next_token_logits, expected_tensors[f"context_prefill/{prompt}/last_logits"]) < RELEASE_ATOL


@pytest.mark.parametrize("case", ["main/block0", "main/block1", "main/after_extend", "main/block0_t_none"])
def test_denoiser_step(release_model, expected, expected_tensors, case):
    spec = expected["denoiser_step"][case]
    cache = release_model.prefill(torch.tensor([expected["prompts"][spec["prompt"]]]))
    if "extend_block" in spec:
        release_model.extend_context(cache, torch.tensor([spec["extend_block"]]))
    block = torch.tensor([spec["noisy_block"]])
    t = None if spec["t"] is None else torch.tensor([spec["t"]])
    logits = release_model.denoise_step(block, cache, t)
    assert max_diff(logits, expected_tensors[f"denoiser_step/{case}/logits"]) < RELEASE_ATOL
    if "argmax" in spec:
        assert logits.argmax(-1)[0].tolist() == spec["argmax"]


@pytest.mark.parametrize("case", STEP_LOGITS_RECORDED)
def test_every_recorded_diffusion_step(release_model, expected, expected_tensors, case):
    """Decodes step by step with the towers' own calls (one prefill, one `extend_context` per block the model
    committed, one `denoise_step` per step) and the commit rule: every step's logits, every noisy block the model
    reaches and the tokens it commits are the ones NVIDIA's code recorded."""
    run = expected["diffusion"][case]
    kwargs = run["kwargs"]
    block_size, steps = kwargs["block_size"], kwargs["steps_per_block"]
    step_logits = expected_tensors[f"diffusion/{case}/step_logits"]
    step_t = expected_tensors[f"diffusion/{case}/step_t"]
    assert len(run["trajectory"]) == step_logits.shape[0] == run["nfe"]

    cache = release_model.prefill(torch.tensor([expected["prompts"][run["prompt"]]]))
    committed, block = [], None
    for k, step in enumerate(run["trajectory"]):
        if step["step"] == 0:  # a new block: the context tower reads the one the model just filled
            if block is not None:
                committed += block[0].tolist()
                release_model.extend_context(cache, block)
            block = torch.full((1, block_size), 3)
        assert step["block"] == len(committed) // block_size
        assert block[0].tolist() == step["xt_before"], f"step {k}: the model's block differs from the recorded one"
        t = (block == 3).float().mean(-1)
        torch.testing.assert_close(t, step_t[k : k + 1], rtol=0, atol=0)
        logits = release_model.denoise_step(block, cache, t)
        assert max_diff(logits, step_logits[k]) < RELEASE_ATOL
        pred, confidence, _ = predict_tokens(logits, 3)
        block = torch.where(commit_mask(confidence, block == 3, step["step"], steps, kwargs["confidence_threshold"]),
                            pred, block)  # fmt: skip
    committed += block[0].tolist()
    assert committed == run["generated_ids"]


def test_ar_step_logits(release_model, expected, expected_tensors):
    """The context tower decoding one token at a time from its cache, as the release's AR mode does."""
    run = expected["ar"]["main"]
    cache = release_model.prefill(torch.tensor([expected["prompts"]["main"]]))
    recorded = expected_tensors["ar/main/step_logits"]
    for k, token in enumerate(run["generated_ids"]):
        assert max_diff(cache.next_token_logits, recorded[k]) < RELEASE_ATOL
        assert cache.next_token_logits.argmax(-1).item() == token
        release_model.extend_context(cache, torch.tensor([[token]]))


def test_mock_ar_step_logits(release_model, expected, expected_tensors):
    """Mock-AR: the denoiser (no time conditioning) re-reads the last context token from the context one token
    behind; the context tower then advances by the chosen token."""
    run = expected["mock_ar"]["main"]
    prompt = expected["prompts"]["main"]
    cache = release_model.prefill(torch.tensor([prompt]))
    recorded = expected_tensors["mock_ar/main/step_logits"]
    last = prompt[-1]
    for k, token in enumerate(run["generated_ids"]):
        logits = release_model.denoise_step(torch.tensor([[last]]), cache, None, behind=True)[:, -1]
        assert max_diff(logits, recorded[k]) < RELEASE_ATOL
        assert logits.argmax(-1).item() == token
        release_model.extend_context(cache, torch.tensor([[token]]))
        last = token
