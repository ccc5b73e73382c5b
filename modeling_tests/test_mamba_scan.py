"""The seeded Mamba scan both towers share (the denoiser from the context's state, the context tower extending by a
block), and the `dt` clamp, against a naive per-token recurrence written here."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import RELEASE_FIXTURE, tiny_model
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from transformers_twotower import backbone_twotower
from transformers_twotower.backbone_twotower import one_chunk_scan


# The release's clamp of the Mamba dt, read from its config.json ([0.0, Infinity]: no clamp), never from the code.
RELEASE_TIME_STEP_LIMIT = tuple(json.loads((RELEASE_FIXTURE / "config.json").read_text())["time_step_limit"])


def naive_seeded_mixer(mixer, hidden, conv_history, ssm_state, time_step_limit=RELEASE_TIME_STEP_LIMIT):
    """Mamba-2 over a block, one token at a time, from a context's conv history and SSM state; `dt` clamped to
    `time_step_limit`."""
    batch, length, _ = hidden.shape
    heads, head_dim, groups, state_size = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    d_inner = heads * head_dim
    z, xbc, dt = (hidden @ mixer.in_proj.weight.T).split([d_inner, mixer.conv_dim, heads], dim=-1)

    # Depthwise causal conv: output t reads inputs t - K + 1 .. t of [history | block].
    inputs = torch.cat([conv_history.transpose(1, 2), xbc], dim=1)  # (B, K - 1 + L, C)
    weight = mixer.conv1d.weight[:, 0, :]  # (C, K)
    kernel = weight.shape[1]
    conv = torch.stack(
        [(inputs[:, t : t + kernel] * weight.T).sum(1) + mixer.conv1d.bias for t in range(length)], dim=1
    )
    x, B, C = F.silu(conv).split([d_inner, groups * state_size, groups * state_size], dim=-1)
    x = x.view(batch, length, heads, head_dim)
    B = B.view(batch, length, groups, state_size)
    C = C.view(batch, length, groups, state_size)
    dt = F.softplus(dt + mixer.dt_bias).clamp(*time_step_limit)
    A = -torch.exp(mixer.A_log)

    state = ssm_state.clone()  # (B, heads, head_dim, state)
    ys = []
    for t in range(length):
        y_t = []
        for h in range(heads):
            g = h // (heads // groups)
            decay = torch.exp(dt[:, t, h] * A[h])[:, None, None]
            state[:, h] = state[:, h] * decay + dt[:, t, h, None, None] * x[:, t, h, :, None] * B[:, t, g, None, :]
            y_t.append(state[:, h] @ C[:, t, g, :, None])
        y = torch.stack(y_t, dim=1)[..., 0] + mixer.D[:, None] * x[:, t]  # (B, heads, head_dim)
        ys.append(y.reshape(batch, d_inner))
    y = torch.stack(ys, dim=1) * F.silu(z)

    grouped = y.view(batch, length, groups, d_inner // groups)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    y = grouped.view(batch, length, d_inner) * mixer.norm.weight
    return y @ mixer.out_proj.weight.T, inputs[:, -kernel:].transpose(1, 2), state


@pytest.mark.parametrize("shortcuts", [True, False], ids=["short-block-shortcuts", "chunked-only"])
@pytest.mark.parametrize("length", [3, 8, 13, 17])  # chunk_size is 8: shorter, equal, longer, > 2 chunks
def test_seeded_scan_equals_naive_recurrence(length, shortcuts, monkeypatch):
    """Blocks no longer than a chunk take the one-chunk quadratic form and the per-tap conv on the CPU; with the
    shortcuts off they take the chunked scan and the convolution, as they do where the kernels are installed."""
    if not (backbone_twotower.SHORT_BLOCK_SCAN and backbone_twotower.SHORT_BLOCK_CONV):
        pytest.skip(
            "the mamba-ssm / causal-conv1d kernels are installed, so the CPU paths compared here are not the ones "
            "taken; test_gpu.py and test_kernels_interpreted.py check the kernel path against the same recurrence"
        )
    monkeypatch.setattr(backbone_twotower, "SHORT_BLOCK_SCAN", shortcuts)
    monkeypatch.setattr(backbone_twotower, "SHORT_BLOCK_CONV", shortcuts)
    calls = []
    monkeypatch.setattr(backbone_twotower, "one_chunk_scan", lambda *a: calls.append(1) or one_chunk_scan(*a))
    model = tiny_model()
    mixer = model.denoiser_tower.layers[0].mixer
    assert mixer.chunk_size == 8
    torch.manual_seed(length)
    hidden = torch.randn(2, length, model.config.hidden_size)
    conv_history = torch.randn(2, mixer.conv_dim, mixer.conv_kernel_size - 1)
    ssm_state = torch.randn(2, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
    with torch.no_grad():
        fast, fast_conv, fast_state = mixer.seeded_scan(hidden, conv_history, ssm_state)
        slow, slow_conv, slow_state = naive_seeded_mixer(mixer, hidden, conv_history, ssm_state)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_conv, slow_conv, rtol=0, atol=0)  # the last K raw conv inputs
    torch.testing.assert_close(fast_state, slow_state, rtol=1e-4, atol=1e-5)
    assert len(calls) == (shortcuts and length <= mixer.chunk_size)


def test_seed_matters():
    """A non-zero seed changes the output; a zero seed equals a plain scan from scratch."""
    model = tiny_model()
    mixer = model.denoiser_tower.layers[0].mixer
    hidden = torch.randn(1, 5, model.config.hidden_size)
    zero_conv = torch.zeros(1, mixer.conv_dim, mixer.conv_kernel_size - 1)
    zero_ssm = torch.zeros(1, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
    with torch.no_grad():
        seeded_zero = mixer.seeded_scan(hidden, zero_conv, zero_ssm)[0]
        unseeded = NemotronHMamba2Mixer.forward(mixer, hidden)  # Nemotron-H's own forward, no cache
        seeded = mixer(hidden, zero_conv, torch.randn_like(zero_ssm))
    torch.testing.assert_close(seeded_zero, unseeded, rtol=1e-4, atol=1e-5)
    assert (seeded - unseeded).abs().max() > 1e-3


@pytest.mark.parametrize("tower", ["context_tower", "denoiser_tower"])
def test_dt_is_clamped_by_the_release_time_step_limit_not_time_step_min(tower):
    """transformers' Nemotron-H clamps dt from below at `time_step_min`; the release applies its `time_step_limit`
    ([0, inf]: no clamp). With every dt far below `time_step_min`, the seeded scan and Nemotron-H's own forward must
    follow the recurrence under the release's limit, which differs measurably from one under `time_step_min`."""
    assert RELEASE_TIME_STEP_LIMIT == (0.0, float("inf"))
    model = tiny_model(time_step_min=0.01)
    mixer = getattr(model, tower).layers[0].mixer
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, model.config.hidden_size, generator=generator)
    conv_history = torch.randn(2, mixer.conv_dim, mixer.conv_kernel_size - 1, generator=generator)
    ssm_state = torch.randn(2, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, generator=generator)
    zero_conv, zero_ssm = torch.zeros_like(conv_history), torch.zeros_like(ssm_state)
    with torch.no_grad():
        mixer.dt_bias.fill_(-8.0)  # softplus(-8 + small) ~ 3e-4, far below time_step_min
        release = naive_seeded_mixer(mixer, hidden, conv_history, ssm_state)
        clamped = naive_seeded_mixer(mixer, hidden, conv_history, ssm_state, (0.01, float("inf")))
        assert (release[0] - clamped[0]).abs().max() > 1e-3, "the clamp must matter for this test to mean anything"
        seeded, _, seeded_state = mixer.seeded_scan(hidden, conv_history, ssm_state)
        torch.testing.assert_close(seeded, release[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seeded_state, release[2], rtol=1e-4, atol=1e-5)
        from_zero = NemotronHMamba2Mixer.forward(mixer, hidden)  # transformers' code path, no cache
        torch.testing.assert_close(
            from_zero, naive_seeded_mixer(mixer, hidden, zero_conv, zero_ssm)[0], rtol=1e-4, atol=1e-5
        )


def test_the_kernel_check_agrees_with_the_path_transformers_takes():
    """`SHORT_BLOCK_CONV` / `SHORT_BLOCK_SCAN` (no package, by `package_provides`) hold exactly when transformers
    bound its torch fallback: only the fallback refuses packed sequences (`seq_idx`) with its "packed sequences"
    message. A package that does not import, and a name it lacks, are "not provided"."""
    from transformers.models.nemotron_h.modeling_nemotron_h import causal_conv1d_fn, mamba2_chunk_scan

    packed = {"seq_idx": torch.zeros(1, 6, dtype=torch.int32)}
    calls = {
        "SHORT_BLOCK_CONV": lambda: causal_conv1d_fn(torch.randn(1, 4, 6), torch.randn(4, 3), **packed),
        "SHORT_BLOCK_SCAN": lambda: mamba2_chunk_scan(
            torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2), -torch.ones(2), torch.randn(1, 6, 1, 3),
            torch.randn(1, 6, 1, 3), chunk_size=4, **packed,
        ),
    }  # fmt: skip
    for flag, call in calls.items():
        try:
            call()
            refused = False
        except Exception as error:  # the kernels may also refuse CPU tensors: only the fallback's message counts
            refused = "packed sequences" in str(error)
        assert refused == getattr(backbone_twotower, flag), flag
    assert backbone_twotower.package_provides("json", "dumps")
    assert not backbone_twotower.package_provides("json", "no_such_function")
    assert not backbone_twotower.package_provides("no_such_package_twotower", "anything")
