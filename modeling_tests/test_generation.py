"""`generate` on the tiny random TwoTower: batching, caches, lengths, outputs, streaming, and an honest API."""

import pytest
import torch
from conftest import DIFFUSION, clean_rows, left_pad, tiny_model, word_tokenizer
from transformers import (
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from transformers_twotower import TwoTowerGenerationConfig
from transformers_twotower.decoding_twotower import Decoder, DecodeSteps
from transformers_twotower.defaults_twotower import GENERATION_MODES
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)  # a seed whose diffusion output is not one repeated token


def generated(sequences, prompt_width):
    return sequences[:, prompt_width:].tolist()


# --- batching -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_batch_equals_each_row_alone(model, mode):
    rows = clean_rows(model, [3, 9, 5])
    ids, mask = left_pad(rows)
    kwargs = dict(generation_mode=mode, max_new_tokens=10, eos_token_id=None, **DIFFUSION)
    batch = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), return_dict_in_generate=True, **kwargs)
        assert generated(batch.sequences[i : i + 1], ids.shape[1]) == generated(alone.sequences, len(row))
        assert batch.nfe[i] == alone.nfe[0]


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_eos_is_per_row(model, mode):
    rows = clean_rows(model, [4, 7], seed=3)
    ids, mask = left_pad(rows)
    kwargs = dict(generation_mode=mode, max_new_tokens=12, pad_token_id=0, **DIFFUSION)
    free = model.generate(torch.tensor([rows[0]]), eos_token_id=None, **kwargs)[0, len(rows[0]) :].tolist()
    eos = free[5]  # a token row 0 produces mid-way
    batch = model.generate(ids, attention_mask=mask, eos_token_id=eos, **kwargs)
    for i, row in enumerate(rows):
        alone = generated(model.generate(torch.tensor([row]), eos_token_id=eos, **kwargs), len(row))[0]
        if eos in alone:
            assert alone[-1] == eos, "a lone row ends on its EOS"
        width = batch.shape[1] - ids.shape[1]
        assert generated(batch[i : i + 1], ids.shape[1])[0] == alone + [0] * (width - len(alone))
    first = generated(batch[:1], ids.shape[1])[0]
    assert eos in first and all(token == 0 for token in first[first.index(eos) + 1 :])


def test_finished_rows_stop_costing_forwards(model):
    rows = clean_rows(model, [4, 4], seed=0)
    ids = torch.tensor(rows)
    free = model.generate(ids, max_new_tokens=12, eos_token_id=None, **DIFFUSION)[:, 4:].tolist()
    eos = next(token for token in free[0][:4] if token not in free[1])  # ends row 0 in its first block only
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos, return_dict_in_generate=True, **DIFFUSION)
    alone = model.generate(ids[1:], max_new_tokens=12, eos_token_id=eos, return_dict_in_generate=True, **DIFFUSION)
    assert out.nfe[0] < out.nfe[1] == alone.nfe[0]


# --- the decode state --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "mode, sampled",
    [("mask_diffusion", False), ("mask_diffusion", True), ("ar", False), ("mock_ar", True)],
    ids=["diffusion-greedy", "diffusion-sampled", "ar-greedy", "mock_ar-sampled"],
)
def test_finished_rows_leave_the_state_and_change_nothing(model, monkeypatch, mode, sampled, compiled):
    """Finished rows leave the decode state at block boundaries (every token in the AR modes; both towers stop
    computing for them; compiled, the state shrinks to a power of two of the live rows, finished rows filling the
    rest): the tokens, NFE, scores and sampling stream are those of the path that keeps every row."""
    rows = clean_rows(model, [3, 9, 5, 7, 4, 8, 6, 2], seed=4)
    ids, mask = left_pad(rows)
    kwargs = dict(generation_mode=mode, max_new_tokens=24, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True, **DIFFUSION)  # fmt: skip
    if sampled:
        kwargs.update(do_sample=True, temperature=0.9, top_k=20)
    if compiled:
        kwargs.update(compile=True, compile_config=CompileConfig(backend="eager", mode=None, fullgraph=True))
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731  (every run draws the same stream)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, generator=seeded(), **kwargs)
    free = free.sequences[:, ids.shape[1] :]
    # EOS: a token of row 0's second block that the fewest other rows produce, so some rows finish and some don't.
    eos = min(free[0, 4:8].tolist(), key=lambda token: int((free == token).any(-1).sum()))
    kwargs["eos_token_id"] = eos

    computed = {"denoiser": [], "context": []}
    extend, denoise = DecodeSteps.extend, DecodeSteps.denoise
    monkeypatch.setattr(DecodeSteps, "extend", lambda self, state, ids, *a: computed["context"].append(ids.shape[0])
                        or extend(self, state, ids, *a))  # fmt: skip
    monkeypatch.setattr(DecodeSteps, "denoise", lambda self, state, ids, *a: computed["denoiser"].append(ids.shape[0])
                        or denoise(self, state, ids, *a))  # fmt: skip
    runs = {}
    for leave in (False, True):
        with monkeypatch.context() as patch:
            if not leave:
                patch.setattr(Decoder, "keep_rows", lambda self, finished: None)
            computed.update(denoiser=[], context=[])
            out = model.generate(
                ids, attention_mask=mask, generator=seeded(), **kwargs,
            )  # fmt: skip
        runs[leave] = (out, {k: list(v) for k, v in computed.items()})
    (kept, kept_rows), (left, left_rows) = runs[False], runs[True]
    assert torch.equal(left.sequences, kept.sequences) and torch.equal(left.nfe, kept.nfe)
    for k, (a, b) in enumerate(zip(left.logits, kept.logits)):  # the rows still generating at position k
        live = left.num_generated > k  # (a finished row's logits are never read; rows not held get 0)
        torch.testing.assert_close(a[live], b[live], rtol=1e-5, atol=1e-5)  # (batch sizes may sum otherwise)
    finished_early = (left.sequences[:, ids.shape[1] :] == eos).any(-1)
    assert finished_early[0] and not finished_early.all()
    # Compiled, the state shrinks only when the live rows fit a smaller power of two (here in mask diffusion).
    assert set(kept_rows["context"]) == {8} and set(kept_rows["denoiser"]) <= {8}  # (AR runs no denoiser)
    if not compiled or mode == "mask_diffusion":
        assert sum(left_rows["context"]) < sum(kept_rows["context"])
        assert mode == "ar" or sum(left_rows["denoiser"]) < sum(kept_rows["denoiser"])
    if compiled and mode == "mask_diffusion":
        sizes = set(left_rows["context"]) | set(left_rows["denoiser"])
        assert sizes <= {1, 2, 4, 8}, "compiled batch sizes are powers of two"  # (fillers: test_static_decoding)


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_context_is_never_recomputed(model, mode):
    """Context-tower token columns processed == prompt + everything committed except the last commit (nothing
    reads the context after it)."""
    processed = []
    hook = model.context_tower.register_forward_pre_hook(
        lambda module, args, kwargs: processed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    ids = torch.tensor(clean_rows(model, [6]))
    try:
        out = model.generate(
            ids, generation_mode=mode, max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True, **DIFFUSION
        )
    finally:
        hook.remove()
    new = out.sequences.shape[1] - 6
    last_commit = 4 if mode == "mask_diffusion" else 1
    assert new == 12 and sum(processed) == 6 + new - last_commit


def test_max_new_tokens_need_not_fill_the_last_block(model):
    ids = torch.tensor(clean_rows(model, [5]))
    whole = model.generate(ids, max_new_tokens=8, eos_token_id=None, **DIFFUSION)
    trimmed = model.generate(ids, max_new_tokens=7, eos_token_id=None, **DIFFUSION)
    assert trimmed.shape == (1, 12) and torch.equal(trimmed, whole[:, :12])


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_one_token_prompt(model, mode):
    """A one-token prompt generates what it generates as a row of a batch whose other row is longer (left padding)."""
    ids, mask = left_pad([[1], clean_rows(model, [5])[0]])
    kwargs = dict(generation_mode=mode, max_new_tokens=5, eos_token_id=None, **DIFFUSION)
    alone = model.generate(ids[:1, -1:], **kwargs)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    assert alone.shape == (1, 6) and (alone[0, 1:] != 3).all()
    assert alone[0, 1:].tolist() == batch[0, 5:].tolist()


def test_ar_mode_equals_transformers_nemotron_h_generate(model):
    reference = context_tower_as_nemotron_h(model)  # the release's dt clamp (none)
    ids = torch.tensor(clean_rows(model, [7]))
    expected = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, generation_mode="ar", max_new_tokens=10, eos_token_id=None), expected)


# --- outputs and streaming --------------------------------------------------------------------------------------------


def test_return_dict_and_history(model):
    ids = torch.tensor(clean_rows(model, [5, 5]))
    out = model.generate(
        ids, max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_history=True, **DIFFUSION
    )
    assert out.nfe.shape == (2,) and out.tokens_per_forward.shape == (2,)
    torch.testing.assert_close(out.tokens_per_forward, 8 / out.nfe.float())
    assert len(out.history) == int(out.nfe.max())
    assert set(out.history[0]) == {"block", "step", "tokens", "t", "committed"}  # no logits kept
    assert torch.equal(out.history[0]["t"], torch.ones(2))
    # `step_callback` is the same observer, with the logits.
    seen = []
    model.generate(ids, max_new_tokens=8, eos_token_id=None, step_callback=seen.append, **DIFFUSION)
    assert len(seen) == len(out.history)
    for step, recorded in zip(seen, out.history):
        assert torch.equal(step.tokens, recorded.tokens) and torch.equal(step.committed, recorded.committed)
        assert step.logits.shape == (2, 4, model.config.vocab_size)


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_streamer_receives_exactly_the_generated_text(model, mode):
    from transformers import TextIteratorStreamer

    tokenizer = word_tokenizer(model.config.vocab_size)
    ids = torch.tensor(clean_rows(model, [5]))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = model.generate(
        ids, generation_mode=mode, max_new_tokens=10, eos_token_id=None, streamer=streamer, **DIFFUSION
    )
    streamed = "".join(streamer)
    assert streamed.split() == tokenizer.decode(out[0, 5:]).split()


def test_streamer_chunks_are_blocks(model):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    ids = torch.tensor(clean_rows(model, [5]))
    out = model.generate(ids, max_new_tokens=10, eos_token_id=None, streamer=recorder, **DIFFUSION)
    assert recorder.ended and recorder.chunks[0] == ids.tolist()
    assert [len(c) for c in recorder.chunks[1:]] == [4, 4, 2]
    assert sum(recorder.chunks[1:], []) == out[0, 5:].tolist()


# --- the ordinary API, honestly -------------------------------------------------------------------------------------


def test_stopping_criteria_and_logits_processor_work(model):
    class StopAt(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, 7] = 0
            return forced

    ids = torch.tensor(clean_rows(model, [5]))
    ar = model.generate(
        ids,
        generation_mode="ar",
        max_new_tokens=10,
        eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([StopAt(8)]),
    )
    assert ar.shape == (1, 8)
    diffusion = model.generate(
        ids, max_new_tokens=12, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAt(8)]), **DIFFUSION
    )
    assert diffusion.shape == (1, 8), "diffusion stops inside the block, where the criterion is met"
    for mode in ("ar", "mock_ar"):
        forced = model.generate(
            ids,
            generation_mode=mode,
            max_new_tokens=4,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([Force()]),
        )
        assert forced[0, 5:].tolist() == [7, 7, 7, 7]
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(ids, max_new_tokens=4, logits_processor=LogitsProcessorList([Force()]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(assistant_model=object()), "assistant_model"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),  # mask diffusion: needs the tokens to its left
        (dict(bad_words_ids=[[5, 6]]), "bad_words_ids"),
        (dict(guidance_scale=2.0), "guidance_scale"),
        (dict(low_memory=True), "low_memory"),  # any field outside the allow-list, not only a listed few
        (dict(generation_mode="ar", step_callback=print), "step_callback"),
        (dict(use_cache=False), "use_cache"),
        (dict(not_an_argument=1), "not_an_argument"),
        (dict(block_size=0), "block_size"),
        (dict(steps_per_block=0), "steps_per_block"),
        (dict(confidence_threshold=-0.1), "confidence_threshold"),
        (dict(confidence_threshold=2.5), "confidence_threshold"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(generation_mode="beam"), "generation_mode"),
        (dict(generation_mode="ar", output_history=True), "output_history"),
    ],
)
def test_bad_arguments_raise_and_leave_no_state(model, kwargs, match):
    before = model.generation_config.to_dict()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[5, 6, 7]]), **kwargs)
    assert model.generation_config.to_dict() == before


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="mask token"):
        model.generate(torch.tensor([[5, 3, 7]]))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="LEFT padding"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, streamer=object())
    # A mask id hidden under left padding is not part of the prompt.
    model.generate(torch.tensor([[3, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]]), max_new_tokens=4)


def test_threshold_above_one_is_one_token_per_step(model):
    ids = torch.tensor(clean_rows(model, [5]))
    out = model.generate(
        ids,
        max_new_tokens=8,
        block_size=4,
        steps_per_block=4,
        confidence_threshold=1.01,
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    assert out.nfe.item() == 8


def test_sampling_is_seeded(model):
    ids = torch.tensor(clean_rows(model, [5]))
    for mode in GENERATION_MODES:
        kwargs = dict(
            generation_mode=mode,
            do_sample=True,
            temperature=1.5,
            top_k=20,
            max_new_tokens=8,
            eos_token_id=None,
            **DIFFUSION,
        )
        a = model.generate(ids, generator=torch.Generator().manual_seed(0), **kwargs)
        b = model.generate(ids, generator=torch.Generator().manual_seed(0), **kwargs)
        c = model.generate(ids, generator=torch.Generator().manual_seed(1), **kwargs)
        assert torch.equal(a, b) and not torch.equal(a, c) and (a != 3).all()


def test_generation_config_is_saved_with_the_model(model, tmp_path):
    from transformers_twotower import TwoTowerForDiffusionLM

    model.generation_config.steps_per_block = 8
    model.generation_config.confidence_threshold = 0.7
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.steps_per_block = 16
        model.generation_config.confidence_threshold = 0.8
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, TwoTowerGenerationConfig)
    assert (loaded.generation_config.steps_per_block, loaded.generation_config.confidence_threshold) == (8, 0.7)
    assert loaded.generation_config.mask_token_id == 3 and loaded.generation_config.block_size == 4
