"""The one decoding path: AR logits against a prefill of the same prefix (the dt clamp written once), what the decode
state refuses, concurrent calls, bad ids, and how often a step reads a value on the host."""

import threading

import pytest
import torch
from conftest import DIFFUSION, clean_rows, left_pad, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.decoding_twotower import DecodeSteps
from transformers_twotower.generation_rows_twotower import RowTracker


TRACE_ONLY = CompileConfig(backend="eager", mode=None, fullgraph=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


# The tiny model's dt is about softplus(-6) = 2.5e-3: a floor of 1 and a ceiling of 1e-3 both change every dt.
LIMITS = [(1.0, float("inf")), (0.0, 1e-3)]


def mamba_sensitive_model(**overrides):
    """The tiny model with its Mamba projections scaled up: its random x, B and C are of order 1e-2, so the scanned
    state hardly reaches the logits and a wrong dt could go unseen."""
    model = tiny_model(seed=3, **overrides)
    with torch.no_grad():
        for tower in (model.context_tower, model.denoiser_tower):
            for layer in tower.layers:
                if layer.block_type == "linear_attention":
                    layer.mixer.in_proj.weight.mul_(40)
    return model


@pytest.mark.parametrize("limit", LIMITS, ids=["floor_1", "ceiling_1e-3"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ar_decode_logits_equal_a_prefill_of_the_prefix(limit, compiled):
    """With a `time_step_limit` that bites (the release's [0, inf] hides a second clamp by 1e-8), every AR step's
    logits equal those of a prefill of the prompt and the tokens generated so far: prefill, one-token decoding and
    the compiled step all clamp dt in the one place. (Before, one-token decoding ignored the limit: up to 30 apart.)"""
    model = mamba_sensitive_model(time_step_limit=limit)
    ids, mask = left_pad(clean_rows(model, [5, 9], seed=2))
    options = dict(generation_mode="ar", max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True,
                   output_logits=True)  # fmt: skip
    if compiled:
        options.update(compile=True, compile_config=TRACE_ONLY)
    out = model.generate(ids, attention_mask=mask, **options)
    for k, logits in enumerate(out.logits):
        prefix = out.sequences[:, : ids.shape[1] + k]
        prefix_mask = torch.cat([mask, torch.ones(2, k, dtype=mask.dtype)], dim=1)
        expected = model.prefill(prefix, prefix_mask, keep_behind=False).next_token_logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        # The forward without a cache (log-likelihoods) is the same computation again.
        torch.testing.assert_close(model(prefix, attention_mask=prefix_mask).logits[:, -1], expected, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("limit", LIMITS, ids=["floor_1", "ceiling_1e-3"])
def test_the_mamba_clamp_is_applied(limit):
    """The limits bite: each moves the logits 10x past the tolerance of the test above."""
    ids = torch.tensor(clean_rows(tiny_model(), [9], seed=2))
    released, clamped = mamba_sensitive_model(), mamba_sensitive_model(time_step_limit=limit)
    assert (clamped.prefill(ids).next_token_logits - released.prefill(ids).next_token_logits).abs().max() > 1e-3


def test_inputs_that_do_not_fit_the_state_are_refused(model):
    ids = torch.tensor(clean_rows(model, [6, 6], seed=1))
    with pytest.raises(ValueError, match=r"A prompt of 6 tokens does not fit the decode state: 0 of its 4"):
        model.prefill(ids, max_length=4)
    state = model.prefill(ids, max_length=8)
    before = {i: k.clone() for i, k in state.keys.items()}
    with pytest.raises(ValueError, match=r"An extension of 4 tokens does not fit the decode state: 6 of its 8"):
        model.extend_context(state, ids[:, :4])
    assert all(torch.equal(state.keys[i], k) for i, k in before.items()), "a refused extension wrote something"
    assert state.num_written == int(state.length) == 6
    model.extend_context(state, ids[:, :2])  # exactly full
    with pytest.raises(ValueError, match="does not fit"):
        model.extend_context(state, ids[:, :1])
    with pytest.raises(ValueError, match="exceeds the state's 4"):
        model.denoise_step(torch.full((2, 5), 3), state, None)


def test_bad_ids_are_refused_before_anything_runs(model):
    ids = torch.tensor(clean_rows(model, [6], seed=1))
    vocab = model.config.vocab_size
    for bad, message in ((ids + vocab, f"id {int(ids.max()) + vocab}, outside the vocabulary's range \\[0, {vocab}\\)"),
                         (ids - 100, "outside the vocabulary's range"), (ids.float(), "integer token ids")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            model.generate(bad, max_new_tokens=4)
        with pytest.raises(ValueError, match=message):
            model.prefill(bad)
    state = model.prefill(ids)
    with pytest.raises(ValueError, match="`token_ids` holds the id -1"):
        model.extend_context(state, torch.tensor([[-1]]))
    with pytest.raises(ValueError, match=f"`block_ids` holds the id {vocab}"):
        model.denoise_step(torch.tensor([[3, vocab]]), state, None)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_concurrent_eager_calls_each_own_their_state(model, mode):
    """Two threads generating on one model at once get what each gets alone (states are per call)."""
    prompts = [left_pad(clean_rows(model, lengths, seed=seed)) for lengths, seed in (([4, 7], 1), ([9, 3, 5], 2))]
    options = dict(generation_mode=mode, max_new_tokens=12, eos_token_id=None, **DIFFUSION)
    alone = [model.generate(ids, attention_mask=mask, **options) for ids, mask in prompts]
    results = [None, None]
    barrier = threading.Barrier(2)

    def run(k):
        barrier.wait()
        for _ in range(3):
            out = model.generate(prompts[k][0], attention_mask=prompts[k][1], **options)
            results[k] = out if results[k] is None or torch.equal(results[k], out) else "differed"

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, torch.Tensor) and torch.equal(r, a) for r, a in zip(results, alone))


def test_a_concurrent_compiled_call_is_refused_clearly(model):
    """Compiled steps (and CUDA graphs) are the model's: while one compiled call runs, another is refused with a
    message saying why, and the model works again after it."""
    ids = torch.tensor(clean_rows(model, [5], seed=1))
    options = dict(max_new_tokens=8, eos_token_id=None, compile=True, compile_config=TRACE_ONLY, **DIFFUSION)
    expected = model.generate(ids, **options)
    started, release, errors = threading.Event(), threading.Event(), []

    def hold(step):  # the first call pauses inside its first denoiser step
        started.set()
        release.wait(timeout=30)

    first = threading.Thread(target=lambda: model.generate(ids, step_callback=hold, **options))
    first.start()
    assert started.wait(timeout=60)
    try:
        model.generate(ids, **options)
    except RuntimeError as error:
        errors.append(str(error))
    finally:
        release.set()
        first.join()
    assert errors and "Another `generate(compile=True)` is running on this model" in errors[0]
    assert torch.equal(model.generate(ids, **options), expected)

    def fail(step):
        raise KeyboardInterrupt  # a user's interrupt in the middle of a compiled call

    with pytest.raises(KeyboardInterrupt):
        model.generate(ids, step_callback=fail, **options)
    assert torch.equal(model.generate(ids, **options), expected), "an interrupted call left the model locked"


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a value (`item`, `bool`, `int`),
    `nonzero`, boolean indexing, and (`Tensor.tolist` does not dispatch) every `tolist` call."""

    def __init__(self):
        super().__init__()
        self.count, self.on = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            boolean_index = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            )
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                        torch.ops.aten.masked_select.default) or boolean_index:  # fmt: skip
                self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar", "mock_ar"])
def test_at_most_one_host_read_per_step(model, mode, monkeypatch):
    """After the prompt is read: mask diffusion reads the host once per denoiser step (is anything still masked?),
    plus once when a block fills before its last step and once at each block's end (which rows finished?); the AR
    modes once per token. Greedy, a batch of two whose first row ends early (it leaves the state), no stop strings."""
    reads = HostReads()
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(
        torch.Tensor, "tolist", lambda self: setattr(reads, "count", reads.count + reads.on) or tolist(self)
    )
    prefill = TwoTowerForDiffusionLM.prefill
    monkeypatch.setattr(
        TwoTowerForDiffusionLM, "prefill", lambda *a, **k: (prefill(*a, **k), setattr(reads, "on", True))[0]
    )
    output = RowTracker.output  # the result's assembly (after the loop) is not a step
    monkeypatch.setattr(RowTracker, "output", lambda *a: (setattr(reads, "on", False), output(*a))[1])
    calls = {"denoise": 0}
    denoise = DecodeSteps.denoise
    monkeypatch.setattr(
        DecodeSteps, "denoise", lambda *a, **k: calls.__setitem__("denoise", calls["denoise"] + 1) or denoise(*a, **k)
    )
    ids, mask = left_pad(clean_rows(model, [4, 7], seed=4))  # a seed where row 0 can end before row 1 in every mode
    options = dict(generation_mode=mode, max_new_tokens=12, return_dict_in_generate=True, **DIFFUSION)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **options).sequences[:, ids.shape[1] :]
    eos = next(token for token in free[0, :4].tolist() if token not in free[1, :8].tolist())  # row 0 ends first
    calls["denoise"], reads.count = 0, 0
    with reads:
        out = model.generate(ids, attention_mask=mask, eos_token_id=eos, **options)
    reads.on = False
    generated = out.sequences.shape[1] - ids.shape[1]
    assert out.num_generated[0] <= 4 < out.num_generated[1]  # row 0 left the state after its first block
    if mode == "mask_diffusion":
        blocks = -(-generated // 4)
        assert calls["denoise"] <= reads.count <= calls["denoise"] + 2 * blocks
    else:
        assert reads.count == generated
