"""Static decoding (`generate(compile=True)`): the decode state, its three steps, and their compiled graphs."""

import pytest
import torch
import torch._dynamo
from conftest import DIFFUSION, clean_rows, left_pad, tiny_model
from transformers import CompileConfig

from transformers_twotower.decoding_twotower import context_step, decode_state, denoise_step
from transformers_twotower.defaults_twotower import GENERATION_MODES


# Dynamo with `fullgraph=True` and no code generation: a graph break or a recompilation shows in its counters.
TRACE_ONLY = CompileConfig(backend="eager", mode=None, fullgraph=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def ragged_batch(model, lengths=(3, 9, 5), seed=1):
    return left_pad(clean_rows(model, lengths, seed))


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_steps_equal_the_cache_path(model):
    """One extension, one AR step and one denoiser step on the state give the logits of the eager cache path,
    which the fixture tests tie to NVIDIA's recordings; the denoiser writes nothing of the context."""
    ids, mask = ragged_batch(model)
    cache = model.prefill(ids, mask, keep_behind=False)
    state = decode_state(model, cache, max_length=24, block_size=4, keep_behind=False)
    block = torch.tensor([[5, 3, 3, 7], [3, 3, 3, 3], [9, 3, 11, 3]])
    t = (block == 3).float().mean(-1)
    context_before = {i: k[:, :, :24].clone() for i, k in state.keys.items()}
    with torch.no_grad():
        torch.testing.assert_close(denoise_step(model, state, block, t, False), model.denoise_step(block, cache, t))
        assert all(torch.equal(state.keys[i][:, :, :24], k) for i, k in context_before.items())
        committed = torch.tensor([[5, 6, 8, 7], [4, 4, 4, 4], [9, 10, 11, 12]])
        torch.testing.assert_close(
            context_step(model, state, committed, False),
            model.extend_context(cache, committed, keep_behind=False).next_token_logits,
        )
        torch.testing.assert_close(
            context_step(model, state, committed[:, :1], False),
            model.extend_context(cache, committed[:, :1], keep_behind=False).next_token_logits,
        )
        torch.testing.assert_close(denoise_step(model, state, block, t, False), model.denoise_step(block, cache, t))
    assert int(state.length) == ids.shape[1] + 5


def test_mock_ar_step_reads_the_context_one_token_behind(model):
    ids, mask = ragged_batch(model)
    cache = model.prefill(ids, mask, keep_behind=True)
    state = decode_state(model, cache, max_length=24, block_size=4, keep_behind=True)
    last = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        model.extend_context(cache, last, keep_behind=True)
        context_step(model, state, last, True)
        torch.testing.assert_close(
            denoise_step(model, state, last, None, True), model.denoise_step(last, cache, None, behind=True)
        )


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_compiled_fullgraph_gives_the_eager_tokens_and_never_recompiles(model, mode):
    """Greedy, a ragged left-padded batch, rows ending early at an EOS: the same tokens and NFE as eager. The steps
    compile once each (fullgraph), nothing recompiles across blocks, and a second call compiles nothing."""
    ids, mask = ragged_batch(model)
    options = dict(generation_mode=mode, max_new_tokens=12, return_dict_in_generate=True, **DIFFUSION)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **options).sequences[:, ids.shape[1] :]
    eos = int(free[1, 5])  # row 1 ends early; the other rows may or may not produce this id
    eager = model.generate(ids, attention_mask=mask, eos_token_id=eos, **options)
    assert eager.sequences.shape[1] > ids.shape[1] and (eager.sequences[1, ids.shape[1] :] == eos).any()
    torch._dynamo.reset()
    before = graphs_compiled()
    compiled = model.generate(ids, attention_mask=mask, eos_token_id=eos, compile=True, compile_config=TRACE_ONLY,
                              **options)  # fmt: skip
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.nfe, eager.nfe)
    steps = {"mask_diffusion": 2, "mock_ar": 2, "ar": 1}[mode]  # denoise + extend; extend (+ denoise behind)
    assert graphs_compiled() - before == steps, "a step recompiled across blocks, or broke into several graphs"
    again = model.generate(ids, attention_mask=mask, eos_token_id=eos, compile=True, compile_config=TRACE_ONLY,
                           **options)  # fmt: skip
    assert torch.equal(again.sequences, eager.sequences)
    assert graphs_compiled() - before == steps, "a second call with the same shapes compiled again"


def test_state_is_reused_for_the_same_batch_and_length(model):
    ids, mask = ragged_batch(model)
    first = decode_state(model, model.prefill(ids, mask, keep_behind=False), 16, 4, False)
    shorter = decode_state(model, model.prefill(ids[:, 2:], mask[:, 2:], keep_behind=False), 16, 4, False)
    assert shorter is first and int(shorter.length) == ids.shape[1] - 2
    assert not shorter.key_real[:, ids.shape[1] - 2 :].any(), "positions of the longer prompt stay masked"
    assert decode_state(model, model.prefill(ids, mask, keep_behind=False), 20, 4, False) is not first
    with pytest.raises(ValueError, match="does not fit"):
        decode_state(model, model.prefill(ids, mask, keep_behind=False), 4, 4, False)


@pytest.mark.slow  # inductor's first compile: 10 to 30 s on 2 cores
def test_inductor_on_cpu_gives_the_eager_tokens():
    """The default CPU compile (inductor, fullgraph): same tokens as eager, on a model of its own (fresh graphs)."""
    model = tiny_model(seed=3)
    ids, mask = ragged_batch(model, (3, 6))
    options = dict(max_new_tokens=8, eos_token_id=None, **DIFFUSION)
    eager = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(model.generate(ids, attention_mask=mask, compile=True, **options), eager)
    assert [key for key in model._static_step_functions if "'backend', 'inductor'" in key], "not inductor"
