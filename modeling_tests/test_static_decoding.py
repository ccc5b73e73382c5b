"""Decoding: the decode state, its two steps eager and compiled, their compiled graphs, and what the state refuses."""

import pytest
import torch
import torch._dynamo
from conftest import DIFFUSION, clean_rows, left_pad, tiny_model
from transformers import CompileConfig

from transformers_twotower.decoding_twotower import DecodeSteps, StatePool
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


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_compiled_fullgraph_gives_the_eager_tokens_and_never_recompiles(model, mode, monkeypatch):
    """Greedy, a ragged left-padded batch, rows ending early at an EOS: the same tokens and NFE as eager. Each step
    compiles once (fullgraph) per batch size the state takes (it shrinks to a power of two of the live rows as rows
    finish), nothing recompiles across blocks, and a second call compiles nothing."""
    ids, mask = ragged_batch(model)
    options = dict(generation_mode=mode, max_new_tokens=12, return_dict_in_generate=True, **DIFFUSION)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **options).sequences[:, ids.shape[1] :]
    eos = int(free[1, 5])  # row 1 ends early; the other rows may or may not produce this id
    eager = model.generate(ids, attention_mask=mask, eos_token_id=eos, **options)
    assert eager.sequences.shape[1] > ids.shape[1] and (eager.sequences[1, ids.shape[1] :] == eos).any()
    sizes = set()
    denoise, extend = DecodeSteps.denoise, DecodeSteps.extend
    monkeypatch.setattr(
        DecodeSteps, "denoise", lambda self, state, *a: sizes.add(state.batch_size) or denoise(self, state, *a)
    )
    monkeypatch.setattr(
        DecodeSteps, "extend", lambda self, state, *a: sizes.add(state.batch_size) or extend(self, state, *a)
    )
    torch._dynamo.reset()
    before = graphs_compiled()
    compiled = model.generate(ids, attention_mask=mask, eos_token_id=eos, compile=True, compile_config=TRACE_ONLY,
                              **options)  # fmt: skip
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.nfe, eager.nfe)
    assert 3 in sizes and sizes - {3} <= {1, 2}, "a state shrinks to power-of-two batch sizes only"
    steps = {"mask_diffusion": 2, "mock_ar": 2, "ar": 1}[mode]  # denoise + extend; extend (+ denoise behind)
    # At most one graph per step and batch size (a size whose rows all finish may never run a step).
    assert steps <= graphs_compiled() - before <= steps * len(sizes), "a step recompiled, or broke into graphs"
    compiled_graphs = graphs_compiled()
    again = model.generate(ids, attention_mask=mask, eos_token_id=eos, compile=True, compile_config=TRACE_ONLY,
                           **options)  # fmt: skip
    assert torch.equal(again.sequences, eager.sequences)
    assert graphs_compiled() == compiled_graphs, "a second call with the same shapes compiled again"


def test_compiled_calls_reuse_their_state_and_never_share_it(model):
    """A compiled call takes a state from the model's pool and gives it back (the next call with the same shapes
    replays on the same addresses); a state taken out is never handed to another call."""
    ids, mask = ragged_batch(model)
    options = dict(max_new_tokens=8, eos_token_id=None, compile=True, compile_config=TRACE_ONLY, **DIFFUSION)
    model.__dict__.pop("_decode_state_pool", None)
    model.generate(ids, attention_mask=mask, **options)
    pool = StatePool.of(model)
    (kept,) = [state for state in pool.free if state.batch_size == 3]
    taken = pool.take(model, *kept.shape_key[:4], ids.device)
    assert taken is kept and kept not in pool.free
    assert pool.take(model, *kept.shape_key[:4], ids.device) is not kept, "a state was handed out twice"
    pool.give_back(taken)


@pytest.mark.slow  # inductor's first compile: 10 to 30 s on 2 cores
def test_inductor_on_cpu_gives_the_eager_tokens():
    """The default CPU compile (inductor, fullgraph): same tokens as eager, on a model of its own (fresh graphs)."""
    model = tiny_model(seed=3)
    ids, mask = ragged_batch(model, (3, 6))
    options = dict(max_new_tokens=8, eos_token_id=None, **DIFFUSION)
    eager = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(model.generate(ids, attention_mask=mask, compile=True, **options), eager)
    assert [key for key in model._compiled_decode_steps if "'backend', 'inductor'" in key], "not inductor"
