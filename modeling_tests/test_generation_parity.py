"""Generation reproduces NVIDIA's recorded runs on the tiny release checkpoint: token ids and NFE exactly."""

import pytest
import torch
from conftest import EXPECTED, RELEASE_ATOL, STEP_LOGITS_RECORDED


DIFFUSION_CASES = sorted(EXPECTED["diffusion"])
PROMPTS = sorted(EXPECTED["prompts"])


def prompt_of(name):
    return torch.tensor([EXPECTED["prompts"][name]])


@pytest.mark.parametrize("case", DIFFUSION_CASES)
def test_mask_diffusion_through_generate(release_model, case):
    run = EXPECTED["diffusion"][case]
    kw = run["kwargs"]
    out = release_model.generate(
        prompt_of(run["prompt"]),
        generation_mode="mask_diffusion",
        max_new_tokens=kw["max_new_tokens"],
        block_size=kw["block_size"],
        steps_per_block=kw["steps_per_block"],
        confidence_threshold=kw["confidence_threshold"],
        mask_token_id=kw["mask_token_id"],
        eos_token_id=kw["eos_token_id"],
        return_dict_in_generate=True,
    )
    assert out.sequences[0].tolist() == run["output_ids"]
    assert out.nfe.tolist() == [run["nfe"]]
    assert out.tokens_per_forward.tolist() == pytest.approx([run["n_generated"] / run["nfe"]])


@pytest.mark.parametrize("case", STEP_LOGITS_RECORDED)
def test_every_step_of_generate_is_the_recorded_one(release_model, expected_tensors, case):
    """Each denoiser step of `generate`, as its step callback sees it, against the step NVIDIA's code recorded: the
    noisy block, its t, and the logits."""
    run = EXPECTED["diffusion"][case]
    kw = run["kwargs"]
    steps = []
    release_model.generate(
        prompt_of(run["prompt"]),
        max_new_tokens=kw["max_new_tokens"],
        block_size=kw["block_size"],
        steps_per_block=kw["steps_per_block"],
        confidence_threshold=kw["confidence_threshold"],
        eos_token_id=kw["eos_token_id"],
        step_callback=steps.append,
    )
    recorded_logits = expected_tensors[f"diffusion/{case}/step_logits"]
    recorded_t = expected_tensors[f"diffusion/{case}/step_t"]
    assert len(steps) == recorded_logits.shape[0] == len(run["trajectory"])
    for k, (step, recorded_step) in enumerate(zip(steps, run["trajectory"])):
        assert (step.block, step.step) == (recorded_step["block"], recorded_step["step"])
        assert step.tokens[0].tolist() == recorded_step["xt_before"]
        torch.testing.assert_close(step.t, recorded_t[k : k + 1], rtol=0, atol=0)
        assert (step.logits - recorded_logits[k]).abs().max().item() < RELEASE_ATOL, f"step {k}"


@pytest.mark.parametrize("case", DIFFUSION_CASES)
def test_mask_diffusion_through_release_alias(release_model, expected_tensors, case):
    run = EXPECTED["diffusion"][case]
    seen = []
    out = release_model.generate_mask_diffusion(
        prompt_of(run["prompt"]), **run["kwargs"], step_callback=lambda block, logits: seen.append((block, logits))
    )
    assert out[0].tolist() == run["output_ids"]
    assert len(seen) == run["nfe"]
    assert [block[0].tolist() for block, _ in seen] == [step["xt_before"] for step in run["trajectory"]]
    if case in STEP_LOGITS_RECORDED:
        recorded = expected_tensors[f"diffusion/{case}/step_logits"]
        assert recorded.shape[0] == len(seen)
        for k, (_, logits) in enumerate(seen):
            assert (logits - recorded[k]).abs().max().item() < RELEASE_ATOL


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_autoregressive_modes(release_model, mode, prompt):
    run = EXPECTED[mode][prompt]
    alias = release_model.generate_ar if mode == "ar" else release_model.generate_mock_ar
    assert alias(prompt_of(prompt), **run["kwargs"])[0].tolist() == run["output_ids"]
    out = release_model.generate(
        prompt_of(prompt), generation_mode=mode, max_new_tokens=run["kwargs"]["max_new_tokens"], eos_token_id=None
    )
    assert out[0].tolist() == run["output_ids"]


@pytest.mark.parametrize("probe", sorted(EXPECTED["eos_probe"]))
def test_eos_probes_through_the_aliases(release_model, probe):
    run = EXPECTED["eos_probe"][probe]
    kind = probe.split("_")[0] if not probe.startswith("mock_ar") else "mock_ar"
    alias = {
        "diffusion": release_model.generate_mask_diffusion,
        "ar": release_model.generate_ar,
        "mock_ar": release_model.generate_mock_ar,
    }[kind]
    assert alias(prompt_of("main"), **run["kwargs"])[0].tolist() == run["output_ids"]
    if "nfe" in run:
        out = release_model.generate(
            prompt_of("main"),
            max_new_tokens=run["kwargs"]["max_new_tokens"],
            block_size=run["kwargs"]["block_size"],
            steps_per_block=run["kwargs"]["steps_per_block"],
            confidence_threshold=run["kwargs"]["confidence_threshold"],
            eos_token_id=run["kwargs"]["eos_token_id"],
            return_dict_in_generate=True,
        )
        assert out.nfe.tolist() == [run["nfe"]]


def test_generate_pads_after_eos_where_the_release_keeps_the_block(release_model):
    """Same EOS probe through `generate`: transformers' convention replaces what follows EOS with padding."""
    run = EXPECTED["eos_probe"]["diffusion_main_b4_s4_thr0.9_n20_eos"]
    kw = run["kwargs"]
    out = release_model.generate(
        prompt_of("main"), max_new_tokens=20, block_size=4, steps_per_block=4, confidence_threshold=0.9,
        eos_token_id=kw["eos_token_id"], pad_token_id=0,
    )  # fmt: skip
    released = run["output_ids"]
    cut = released.index(kw["eos_token_id"], len(EXPECTED["prompts"]["main"])) + 1
    assert out[0].tolist() == released[:cut]
