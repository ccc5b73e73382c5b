"""GPU checks: the CUDA kernels (mamba-ssm, causal-conv1d) against the naive recurrence and the release fixture, and
`compile=True` against eager. Skipped, with the reason, where there is no GPU or no kernels. bf16 against fp32 is
checked on every device by test_bf16.py.

fp32 checks are made in fp32: Triton's `tl.dot` computes fp32 products in TF32 unless told otherwise, and mamba-ssm's
chunk-scan kernels do not say. TF32 keeps 11 significant bits (unit roundoff 2^-11), so under the bound test_bf16.py
derives for bf16, 2 * u * sqrt(L) * max|logits|, the fixture's logits may move by up to 0.16; an H200 run moved
them by 1.5e-2. `TRITON_F32_DEFAULT=ieee` is set before any kernel compiles (this file runs in a process of its
own, with a Triton cache of its own: benchmarks/gpu_check.sh), and then the recorded logits must agree to 5e-3.
"""

import importlib.util
import os


os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
import torch
from conftest import EXPECTED, load_release, tiny_model
from test_mamba_scan import naive_seeded_mixer
from test_training import blockwise_and_dense


CUDA = torch.cuda.is_available()
KERNELS = importlib.util.find_spec("mamba_ssm") is not None and importlib.util.find_spec("causal_conv1d") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
needs_kernels = pytest.mark.skipif(not (CUDA and KERNELS), reason="needs CUDA and the mamba-ssm/causal-conv1d kernels")


@needs_kernels
@pytest.mark.parametrize("length", [3, 8, 13, 16, 40])
def test_kernel_seeded_scan_equals_naive_recurrence(length):
    """The chunked Triton kernel with a block shorter than, equal to and longer than its chunk, from a context state."""
    model = tiny_model().cuda()
    mixer = model.denoiser_tower.layers[0].mixer
    generator = torch.Generator().manual_seed(length)
    hidden = torch.randn(2, length, model.config.hidden_size, generator=generator).cuda()
    conv_history = torch.randn(2, mixer.conv_dim, mixer.conv_kernel_size - 1, generator=generator).cuda()
    ssm_state = torch.randn(2, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, generator=generator).cuda()
    with torch.no_grad():
        fast, _, fast_state = mixer.seeded_scan(hidden, conv_history, ssm_state)
        slow, _, slow_state = naive_seeded_mixer(mixer, hidden, conv_history, ssm_state)
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast_state, slow_state, rtol=1e-3, atol=1e-4)


@needs_cuda
def test_release_fixture_on_gpu_fp32(expected_tensors):
    model = load_release().cuda()
    prompt = torch.tensor([EXPECTED["prompts"]["main"]]).cuda()
    logits = model(prompt).logits.cpu()
    assert (logits - expected_tensors["context_forward/main/logits"]).abs().max() < 5e-3
    for case, run in EXPECTED["diffusion"].items():
        ids = torch.tensor([EXPECTED["prompts"][run["prompt"]]]).cuda()
        out = model.generate(ids, **{k: v for k, v in run["kwargs"].items() if k not in ("temperature", "top_k")},
                             return_dict_in_generate=True)  # fmt: skip
        assert out.sequences[0].tolist() == run["output_ids"], case
        assert out.nfe.item() == run["nfe"], case


@needs_cuda
@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_compiled_generation_on_gpu_agrees_with_eager(mode):
    """`compile=True` exactly as a user calls it: its CUDA defaults (inductor, `reduce-overhead` CUDA graphs,
    fullgraph) on the default experts implementation, in bf16 (transformers' `grouped_mm` experts take a host-synced
    fallback in fp32, which no CUDA graph holds); the release fixture, a batch of two with left padding. Inductor
    fuses and so rounds otherwise than eager: the first step's logits (same inputs) agree within test_bf16's rounding
    bound; later tokens may part at a near tie, so they are compared only for what they must be (the prompt kept, as
    many tokens, no mask id). A second call replays what the first compiled."""
    model = load_release(torch.bfloat16).cuda()
    main = EXPECTED["prompts"]["main"]
    ids = torch.tensor([main, [0] * 4 + main[4:]]).cuda()
    mask = (torch.arange(ids.shape[1], device="cuda") >= torch.tensor([[0], [4]], device="cuda")).long()
    options = dict(generation_mode=mode, max_new_tokens=48, block_size=16, eos_token_id=None)
    first = {}

    def generate(**extra):
        logits = []
        if mode == "mask_diffusion":
            extra["step_callback"] = lambda step: logits.append(step.logits)
        else:
            extra.update(output_logits=True, return_dict_in_generate=True)
        out = model.generate(ids, attention_mask=mask, **options, **extra)
        sequences = out if mode == "mask_diffusion" else out.sequences
        return sequences, (logits[0] if logits else out.logits[0]).float()

    eager, first["eager"] = generate()
    for _ in range(2):
        compiled, first["compiled"] = generate(compile=True)
        bound = 2 * 2.0**-8 * model.config.num_hidden_layers**0.5 * first["eager"].abs().max().item()
        assert (first["compiled"] - first["eager"]).abs().max().item() <= bound
        assert compiled.shape == eager.shape and torch.equal(compiled[:, : ids.shape[1]], ids)
        assert (compiled != model.config.mask_token_id).all()


@needs_cuda
def test_flex_attention_training_gives_the_dense_masks_loss_and_gradients(monkeypatch):
    """On CUDA, training attention is one compiled `flex_attention` call per layer (test_training.py holds the CPU
    forms): the dense reference's loss and gradients, fp32 with IEEE dots. The 1e-4 bound has not yet been measured
    against a run."""
    import transformers_twotower.denoiser_twotower as denoiser

    calls = []
    flex = denoiser.compiled_flex_attention()
    monkeypatch.setattr(denoiser, "compiled_flex_attention", lambda: lambda *a, **k: calls.append(1) or flex(*a, **k))
    model = load_release().cuda().train()
    (loss, grads), (dense_loss, dense_grads) = blockwise_and_dense(model, monkeypatch)
    attention_layers = sum(layer.block_type == "full_attention" for layer in model.denoiser_tower.layers)
    assert len(calls) == attention_layers > 0, "one flex_attention call per attention layer"
    torch.testing.assert_close(loss, dense_loss, rtol=0, atol=1e-4)
    assert grads.keys() == dense_grads.keys() and grads
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-4, msg=name)
