"""Decoding: the decode state, its two steps eager and compiled, their compiled graphs, and what the state refuses."""

import copy
import pickle

import pytest
import torch
import torch._dynamo
from conftest import DIFFUSION, EXPECTED_PROMPTS, clean_rows, left_pad, load_release, tiny_model
from transformers import CompileConfig

from transformers_twotower.decoding_twotower import Decoder, DecodeSteps, StatePool
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
    replays on the same addresses, emptied: a prompt with other padding gets the eager tokens); a state taken out is
    never handed to another call. The model still copies and pickles (the pool lives beside it)."""
    ids, mask = ragged_batch(model)
    options = dict(max_new_tokens=8, eos_token_id=None, compile=True, compile_config=TRACE_ONLY, **DIFFUSION)
    pool = StatePool.of(model)
    pool.clear()
    model.generate(ids, attention_mask=mask, **options)
    (kept,) = pool.free
    other_ids, other_mask = left_pad(clean_rows(model, (9, 4, 2), seed=5))  # the same width, other padding
    eager = model.generate(other_ids, attention_mask=other_mask, **{**options, "compile": False})
    assert torch.equal(model.generate(other_ids, attention_mask=other_mask, **options), eager)
    assert pool.free == [kept], "the second call did not reuse the state"
    taken = pool.take(model, *kept.shape_key[:5])
    assert taken is kept and not pool.free
    assert pool.take(model, *kept.shape_key[:5]) is not kept, "a state was handed out twice"
    pool.give_back(taken)
    copy.deepcopy(model)
    pickle.dumps(model)


@pytest.mark.slow  # inductor's first compile: 10 to 30 s on 2 cores
@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_inductor_on_cpu_gives_the_eager_tokens(mode):
    """The default CPU compile (inductor, fullgraph) on the release fixture, three blocks of 16 (two extensions):
    the eager tokens and NFE, on a model of its own (fresh graphs). Inductor's code went wrong twice where the traced
    graph was right: an extension graph that returned nothing but its writes (other tokens from the second block
    on; the tiny random model did not show it), and Mock-AR's one-token step, which copied the Mamba states behind
    inside the graph and lost the block's write of the new ones."""
    model = load_release()
    ids = torch.tensor([EXPECTED_PROMPTS["main"]])
    options = dict(generation_mode=mode, max_new_tokens=48, eos_token_id=None, return_dict_in_generate=True)
    eager = model.generate(ids, **options)
    compiled = model.generate(ids, compile=True, **options)
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(compiled.nfe, eager.nfe)
    assert [key for key in StatePool.of(model).compiled_steps if "'backend', 'inductor'" in key], "not inductor"


@pytest.mark.parametrize("step", ["context", "denoise"])
def test_each_layer_kind_is_traced_once_whatever_the_depth(step):
    """Each block's forward is a nested compile region: a compiled step holds one subgraph per layer kind, called once
    per layer, so a deeper model adds calls, not subgraphs to compile (the compile times at real widths:
    benchmarks/bench_compile_depth.py). Every kind occurs at least twice here: dynamo inlines a region used once."""
    captured = {}

    def capture(graph_module, example_inputs):
        captured["graph"] = graph_module
        return graph_module.forward

    counts = {}
    for layers in (8, 16):
        torch._dynamo.reset()
        model = tiny_model(hybrid_override_pattern="M*E-" * (layers // 4))
        ids = torch.tensor(clean_rows(model, [5], seed=1))
        state = model.prefill(ids, max_length=16)
        steps = DecodeSteps(model, CompileConfig(backend=capture, mode=None, fullgraph=True))
        with torch.no_grad():
            if step == "context":
                steps.extend(state, ids[:, :4])
            else:
                steps.denoise(state, torch.full((1, 4), 3), torch.ones(1))
        graph = captured.pop("graph")
        calls = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
        subgraphs = {node.args[0].target for node in calls}
        counts[layers] = (len(calls), len(subgraphs))
    assert counts == {8: (8, 4), 16: (16, 4)}


def test_a_compiled_state_shrinks_to_a_power_of_two_with_finished_rows_as_filler(model):
    """Three live rows of eight: the compiled state shrinks to four, the live rows first and one finished row as
    filler; the live rows' logits are those of the whole state, and rows no longer held get 0."""
    ids, mask = left_pad(clean_rows(model, [3, 9, 5, 7, 4, 8, 6, 2], seed=4))
    block = torch.randint(4, model.config.vocab_size, (8, 4), generator=torch.Generator().manual_seed(0))
    block[:, ::2] = model.config.mask_token_id
    t = torch.full((8,), 0.5)
    finished = [True, False, True, True, False, True, True, False]
    with torch.no_grad():
        with Decoder(model, ids, mask, 8, 4, False) as whole:  # eager, every row held
            expected = whole.denoise(block, t)
        with Decoder(model, ids, mask, 8, 4, False, TRACE_ONLY) as decoder:
            decoder.keep_rows(finished)
            held, size = list(decoder.held), decoder.state.batch_size
            logits = decoder.denoise(block, t)
    assert size == 4 and held[:3] == [1, 4, 7] and finished[held[3]]
    torch.testing.assert_close(logits[held], expected[held], rtol=1e-5, atol=1e-5)
    dropped = [row for row in range(8) if row not in held]
    assert not logits[dropped].any()
