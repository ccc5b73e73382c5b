"""The GPU kernel path: mamba-ssm's Triton kernels, run on the CPU under Triton's interpreter (or on a GPU).

Run in a process of its own, with the plugin that makes mamba-ssm runnable there (`.ci/run` does):

    PYTHONPATH=modeling_tests python -m pytest -p interpreted_kernels modeling_tests/test_kernels_interpreted.py

`benchmarks/gpu_check.sh` runs the same file with `TWOTOWER_KERNELS=cuda`: real CUDA kernels, no interpreter. Each
test checks, by counting calls, that the kernels ran. The interpreter is slow (about 0.4 s per chunk-scan call on
2 cores): the scan cases are small, and the release fixture's cases are its own tiny ones (every recorded
generation, about 6 minutes in all: those are marked slow).

Where these tests must run, `TWOTOWER_REQUIRE_KERNEL_TESTS=1` (`.ci/run` sets it) turns the two skips below into
failures: without it, a run missing the plugin or the packages passes with nothing tested.
"""

import os

import pytest
import torch
from conftest import EXPECTED, EXPECTED_PROMPTS, RELEASE_ATOL, left_pad, tiny_model
from test_mamba_scan import naive_seeded_mixer


def skip_unless_required(reason: str):
    """Skip the module with `reason`, or fail it where the kernel tests are required (`.ci/run`)."""
    if os.environ.get("TWOTOWER_REQUIRE_KERNEL_TESTS") == "1":
        pytest.fail(f"{reason}; TWOTOWER_REQUIRE_KERNEL_TESTS=1 requires these tests to run", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if os.environ.get("TWOTOWER_INTERPRETED_KERNELS") != "1":
    skip_unless_required(
        "the kernel path runs in its own process, with the plugin that loads mamba-ssm before transformers: "
        "PYTHONPATH=modeling_tests python -m pytest -p interpreted_kernels modeling_tests/test_kernels_interpreted.py"
    )
import interpreted_kernels  # noqa: E402


if not interpreted_kernels.AVAILABLE:
    skip_unless_required("mamba-ssm, triton or einops is not installed (see .ci/run)")

from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: E402

from transformers_twotower import TwoTowerForDiffusionLM  # noqa: E402


ON_GPU = interpreted_kernels.ON_GPU
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
EXPECTED_DIFFUSION = EXPECTED["diffusion"]


def calls(name: str) -> int:
    return interpreted_kernels.CALLS[name]


@pytest.fixture(scope="module")
def release_model(release_model) -> TwoTowerForDiffusionLM:
    """conftest's release model on this file's device (this file runs in a process of its own)."""
    return release_model.to(DEVICE)


def prompt(name: str) -> torch.Tensor:
    return torch.tensor([EXPECTED_PROMPTS[name]], device=DEVICE)


# --- the seeded scan ----------------------------------------------------------------------------------------------


def close_in_fp32(actual, expected, chunk_size: int):
    """The kernels' fp32 results against an fp32 reference. Interpreted, or compiled with `TRITON_F32_DEFAULT=ieee`
    (gpu_check.sh), their dot products are IEEE fp32 and agree within 1e-4 relative. Compiled with Triton's default,
    a GPU computes them in TF32 (unit roundoff u = 2^-11), whose rounding errors add like a random walk over a chunk's
    terms: then the bound is 2 * u * sqrt(chunk_size) * max|expected|."""
    if ON_GPU and os.environ.get("TRITON_F32_DEFAULT") != "ieee":
        bound = 2 * 2.0**-11 * chunk_size**0.5 * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=0, atol=bound)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def scan_inputs(model, length: int, seed: int):
    mixer = model.denoiser_tower.layers[0].mixer
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, length, model.config.hidden_size, generator=generator)
    conv_history = torch.randn(2, mixer.conv_dim, mixer.conv_kernel_size - 1, generator=generator)
    ssm_state = torch.randn(2, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, generator=generator)
    return mixer, hidden.to(DEVICE), conv_history.to(DEVICE), ssm_state.to(DEVICE)


@pytest.mark.parametrize("length", [5, 8, 13])  # chunk_size 8: a block shorter than, equal to, longer than a chunk
def test_seeded_scan_through_the_kernel_equals_the_recurrence(length):
    model = tiny_model().to(DEVICE)
    mixer, hidden, conv_history, ssm_state = scan_inputs(model, length, seed=length)
    before = calls("mamba_chunk_scan_combined")
    with torch.no_grad():
        fast, fast_conv, fast_state = mixer.seeded_scan(hidden, conv_history, ssm_state)
        slow, slow_conv, slow_state = naive_seeded_mixer(mixer, hidden, conv_history, ssm_state)
    assert calls("mamba_chunk_scan_combined") == before + 1, "the scan must go through mamba-ssm's kernel"
    close_in_fp32(fast, slow, mixer.chunk_size)
    torch.testing.assert_close(fast_conv, slow_conv, rtol=0, atol=0)
    close_in_fp32(fast_state, slow_state, mixer.chunk_size)


@pytest.mark.parametrize("length", [5, 8, 13])
def test_the_kernel_given_initial_states_equals_the_superposition(length):
    """A characterisation of mamba-ssm's kernel on a path the package does not take: the chunked kernel handed the
    initial state directly (`initial_states=`), against the superposition the package uses (the kernel from zero,
    plus the state's decayed contribution in closed form, exact by construction; docs/architecture.md, "The kernel
    path"). A block shorter than the chunk is the case reported elsewhere as wrong. Here it agrees within fp32's
    rounding, and on a GPU within TF32's where Triton's default precision is on (an H200 run: max abs 2.2e-4)."""
    model = tiny_model().to(DEVICE)
    mixer, hidden, conv_history, ssm_state = scan_inputs(model, length, seed=100 + length)
    with torch.no_grad():
        out, _, state = mixer.seeded_scan(hidden, conv_history, ssm_state)
        # The same scan, with the initial state handed to the kernel: the mixer's own steps up to the scan.
        gate, xBC, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], -1)
        conv_inputs = torch.cat([conv_history, xBC.transpose(1, 2)], dim=-1)
        weight = mixer.conv1d.weight.squeeze(1)
        xBC = torch.nn.functional.silu(
            torch.nn.functional.conv1d(conv_inputs, weight[:, None], mixer.conv1d.bias, groups=mixer.conv_dim)
        )
        xBC = xBC[..., -length:].transpose(1, 2)
        groups_state = mixer.n_groups * mixer.ssm_state_size
        x, B, C = xBC.split([mixer.intermediate_size, groups_state, groups_state], dim=-1)
        dt = torch.nn.functional.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)
        y, direct_state = mamba_chunk_scan_combined(
            x.reshape(2, length, mixer.num_heads, mixer.head_dim).contiguous(),
            dt.contiguous(),
            -torch.exp(mixer.A_log),
            B.reshape(2, length, mixer.n_groups, mixer.ssm_state_size).contiguous(),
            C.reshape(2, length, mixer.n_groups, mixer.ssm_state_size).contiguous(),
            chunk_size=mixer.chunk_size,
            D=mixer.D,
            initial_states=ssm_state,
            return_final_states=True,
        )
        direct = mixer.out_proj(mixer.norm(y.reshape(2, length, -1), gate))
    close_in_fp32(direct, out, mixer.chunk_size)
    close_in_fp32(direct_state, state, mixer.chunk_size)


# --- the release fixture with the kernels -------------------------------------------------------------------------


def test_context_and_denoiser_logits_match_the_release(release_model, expected, expected_tensors):
    """The recorded context logits of every prompt, and every recorded denoiser step."""
    before = calls("mamba_chunk_scan_combined")
    for name in EXPECTED_PROMPTS:
        logits = release_model(prompt(name)).logits.cpu()
        assert (logits - expected_tensors[f"context_forward/{name}/logits"]).abs().max() < RELEASE_ATOL, name
    for case, spec in expected["denoiser_step"].items():
        cache = release_model.prefill(prompt(spec["prompt"]))
        if "extend_block" in spec:
            release_model.extend_context(cache, torch.tensor([spec["extend_block"]], device=DEVICE))
        t = None if spec["t"] is None else torch.tensor([spec["t"]], device=DEVICE)
        step = release_model.denoise_step(torch.tensor([spec["noisy_block"]], device=DEVICE), cache, t).cpu()
        assert (step - expected_tensors[f"denoiser_step/{case}/logits"]).abs().max() < RELEASE_ATOL, case
    assert calls("mamba_chunk_scan_combined") > before


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPTS))
@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_autoregressive_modes_match_the_release(release_model, expected, mode, name):
    """Both decode one token at a time through `selective_state_update`: AR's context steps, and Mock-AR's too, with
    its denoiser's one-token blocks."""
    counted = "selective_state_update"
    before = calls(counted)
    run = expected[mode][name]
    new_tokens = run["kwargs"]["max_new_tokens"]
    out = release_model.generate(prompt(name), generation_mode=mode, max_new_tokens=new_tokens, eos_token_id=None)
    assert out[0].tolist() == run["output_ids"]
    # Per Mamba layer, one call per one-token scan: the extensions by each generated token but the last; Mock-AR adds
    # its denoiser's one-token block per token and its two-pass prefill's last token (and first pass, for a two-token
    # prompt).
    mamba_layers = release_model.config.layers_block_type.count("linear_attention")
    per_layer = new_tokens - 1
    if mode == "mock_ar":
        per_layer += new_tokens + 1 + (len(EXPECTED_PROMPTS[name]) == 2)
    assert calls(counted) - before == mamba_layers * per_layer


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED_DIFFUSION))
def test_mask_diffusion_matches_the_release(release_model, case):
    run = EXPECTED_DIFFUSION[case]
    before = calls("mamba_chunk_scan_combined")
    kwargs = {k: v for k, v in run["kwargs"].items() if k not in ("temperature", "top_k")}
    out = release_model.generate(prompt(run["prompt"]), **kwargs, return_dict_in_generate=True)
    assert out.sequences[0].tolist() == run["output_ids"] and out.nfe.item() == run["nfe"]
    assert calls("mamba_chunk_scan_combined") > before


def test_a_batch_gives_each_row_what_it_gets_alone():
    model = tiny_model(seed=3).to(DEVICE)
    rows = [[5, 17, 40], [9, 22, 31, 48, 12]]
    ids, mask = left_pad(rows)
    kwargs = dict(max_new_tokens=4, block_size=4, steps_per_block=2, eos_token_id=None)
    batch = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), **kwargs)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row], device=DEVICE), **kwargs)
        assert batch[i, -4:].tolist() == alone[0, -4:].tolist()
