"""Every generation control, row by row as docs/generation.md's "Controls" table gives them: in AR and Mock-AR as a
stock transformers model applies them, in mask diffusion position by position, or refused by name."""

import pytest
import torch
from conftest import DIFFUSION, clean_ids, tiny_model
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import RepetitionPenaltyLogitsProcessor, StopStringCriteria

from transformers_twotower.defaults_twotower import GENERATION_MODES
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h


EOS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def stock(model):
    return context_tower_as_nemotron_h(model)


# --- AR: the stock model's tokens, for every processor transformers builds -------------------------------------------

AR_CONTROLS = {
    "repetition_penalty": dict(repetition_penalty=1.5),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[10], [11, 12]]),
    "sequence_bias": dict(sequence_bias={(9,): 4.0, (20, 21): -4.0}),
    "suppress_tokens": dict(suppress_tokens=[5, 6, 7]),
    "min_new_tokens": dict(min_new_tokens=8, eos_token_id=EOS, sequence_bias={(EOS,): 6.0}),
    "min_p": dict(do_sample=True, min_p=0.2, temperature=0.7),
    "top_k_top_p": dict(do_sample=True, top_k=5, top_p=0.9),
    "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda row, ids: [int(ids[-1]) % 50 + 4, 9]),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=3),
    "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", AR_CONTROLS)
def test_ar_equals_the_stock_model(model, stock, name):
    kwargs = {"eos_token_id": None, **AR_CONTROLS[name]}
    ids = clean_ids(model, 2, 6)
    torch.manual_seed(0)
    expected = stock.generate(ids, max_new_tokens=12, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    got = model.generate(ids, generation_mode="ar", max_new_tokens=12, **kwargs)
    assert torch.equal(got, expected)
    if name == "num_return_sequences":
        assert got.shape[0] == 6 and not torch.equal(got[0], got[1])


def test_ar_scores_and_logits_equal_the_stock_model(model, stock):
    ids = clean_ids(model, 2, 6)
    kwargs = dict(max_new_tokens=6, eos_token_id=None, repetition_penalty=1.5, return_dict_in_generate=True)
    expected = stock.generate(ids, pad_token_id=0, output_scores=True, output_logits=True, **kwargs)
    got = model.generate(ids, generation_mode="ar", output_scores=True, output_logits=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences) and len(got.scores) == len(expected.scores) == 6
    for ours, theirs in [*zip(got.scores, expected.scores), *zip(got.logits, expected.logits)]:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got.scores[1], got.logits[1]), "the penalty processed the scores"
    transitions = model.compute_transition_scores(got.sequences, got.scores, normalize_logits=True)
    torch.testing.assert_close(
        transitions, stock.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=True)
    )


# --- Mock-AR: the same processors on the denoiser's next-token distribution ----------------------------------------


def test_mock_ar_applies_the_configured_processors(model):
    ids = clean_ids(model, 1, 6)
    kwargs = dict(generation_mode="mock_ar", max_new_tokens=10, eos_token_id=None)
    plain = model.generate(ids, **kwargs)
    by_config = model.generate(ids, repetition_penalty=3.0, **kwargs)
    by_hand = model.generate(
        ids, logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)]), **kwargs
    )
    assert torch.equal(by_config, by_hand) and not torch.equal(by_config, plain)
    banned = plain[0, 6:].unique()[:3].tolist()
    assert not set(banned) & set(model.generate(ids, suppress_tokens=banned, **kwargs)[0, 6:].tolist())


# --- mask diffusion: position-wise controls, refusals --------------------------------------------------------------


def test_diffusion_repetition_penalty_matches_a_slow_reference(model):
    """Every committed token is the argmax of its position's penalised distribution, the penalty over the context and
    the block's committed tokens as they stood at that step."""
    ids, penalty = clean_ids(model, 1, 6), 2.0
    steps = []
    out = model.generate(
        ids, max_new_tokens=8, eos_token_id=None, repetition_penalty=penalty, step_callback=steps.append, **DIFFUSION
    )
    plain = model.generate(ids, max_new_tokens=8, eos_token_id=None, **DIFFUSION)
    assert not torch.equal(out, plain), "the penalty must change this output, or the test shows nothing"
    for step in steps:
        done_blocks = out[:, : 6 + 4 * step.block]
        context = torch.cat([done_blocks, step.tokens], dim=-1)
        logits = step.logits[0].float().clone()
        logits[:, 3] = float("-inf")
        taken = torch.gather(logits, 1, context.expand(4, -1))
        logits.scatter_(1, context.expand(4, -1), torch.where(taken < 0, taken * penalty, taken / penalty))
        committed = step.committed[0]
        block_after = out[0, 6 + 4 * step.block : 6 + 4 * step.block + 4]
        assert torch.equal(block_after[committed], logits.argmax(-1)[committed])


@pytest.mark.parametrize(
    "control", [dict(suppress_tokens="banned"), dict(bad_words_ids="banned"), dict(sequence_bias="banned")]
)
def test_diffusion_bans_tokens_at_every_position(model, control):
    ids = clean_ids(model, 2, 6)
    plain = model.generate(ids, max_new_tokens=12, eos_token_id=None, **DIFFUSION)
    banned = plain[:, 6:].flatten().unique()[:4].tolist()
    value = {
        "suppress_tokens": banned,
        "bad_words_ids": [[token] for token in banned],
        "sequence_bias": {(token,): float("-inf") for token in banned},
    }[next(iter(control))]
    out = model.generate(ids, max_new_tokens=12, eos_token_id=None, **{next(iter(control)): value}, **DIFFUSION)
    assert not set(banned) & set(out[:, 6:].flatten().tolist())


def test_diffusion_min_new_tokens_bans_eos_before_it(model):
    favour_eos = dict(eos_token_id=EOS, sequence_bias={(EOS,): 50.0}, max_new_tokens=12, **DIFFUSION)
    ids = clean_ids(model, 1, 6)
    assert model.generate(ids, **favour_eos)[0, 6:].tolist() == [EOS]
    out = model.generate(ids, min_new_tokens=6, **favour_eos)[0, 6:].tolist()
    assert out[6] == EOS and EOS not in out[:6] and len(out) == 7
    assert model.generate(ids, min_length=6 + 5, **favour_eos)[0, 6:].tolist().index(EOS) == 5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (dict(bad_words_ids=[[5, 6]]), "bad_words_ids"),
        (dict(sequence_bias={(5, 6): 1.0}), "sequence_bias"),
        (dict(prefix_allowed_tokens_fn=lambda row, ids: [5]), "prefix_allowed_tokens_fn"),
        (dict(forced_eos_token_id=EOS), "forced_eos_token_id"),
        (dict(begin_suppress_tokens=[5]), "begin_suppress_tokens"),
        (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=EOS), "exponential_decay_length_penalty"),
        (dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0)])), "logits_processor"),
    ],
)
def test_diffusion_refuses_controls_that_need_the_left_tokens(model, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` is not supported in `mask_diffusion` mode"):
        model.generate(clean_ids(model, 1, 6), max_new_tokens=4, **kwargs)
    model.generate(
        clean_ids(model, 1, 6), generation_mode="mock_ar", max_new_tokens=4, **kwargs
    )  # fine token by token


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(num_beams=2), "num_beams"),
        (dict(guidance_scale=1.5), "guidance_scale"),
        (dict(num_return_sequences=2), "do_sample"),
    ],
)
def test_refused_in_every_mode(model, kwargs, match):
    for mode in GENERATION_MODES:
        with pytest.raises(ValueError, match=match):
            model.generate(clean_ids(model, 1, 6), generation_mode=mode, max_new_tokens=4, **kwargs)


def test_prompt_past_the_position_limit_warns(model, caplog):
    ids = clean_ids(model, 1, model.config.max_position_embeddings - 2)
    with caplog.at_level("WARNING"):
        model.generate(ids, generation_mode="ar", max_new_tokens=4, eos_token_id=None)
    assert "max_position_embeddings" in caplog.text


# --- stopping inside a block -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_a_stop_string_ending_inside_a_block_stops_there(demo, mode):
    from transformers import TextIteratorStreamer

    model, tokenizer = demo
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    kwargs = dict(generation_mode=mode, max_new_tokens=48, return_dict_in_generate=True)
    full = model.generate(ids, **kwargs)
    generated = full.sequences[0, ids.shape[1] :]
    stop = tokenizer.decode(generated[17:21])  # ends in the middle of the second block
    criterion = StopStringCriteria(tokenizer, [stop])
    # The reference: the first prefix of the unstopped text that the criterion accepts (the tokens before a stop
    # never change: a row's committed tokens do not depend on when it stops).
    length = next(n for n in range(1, len(generated) + 1) if criterion(generated[None, :n], None)[0])
    assert length % 16 != 0 and length < len(generated)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    stopped = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, streamer=streamer, **kwargs)
    assert stopped.sequences[0, ids.shape[1] :].tolist() == generated[:length].tolist()
    assert "".join(streamer) == tokenizer.decode(generated[:length])
    assert int(stopped.nfe) <= int(full.nfe)


def test_diffusion_stops_on_eos_inside_the_block_and_saves_the_forwards(model):
    """Transformers' EOS rule: the same tokens as finishing the block and cutting at EOS, in fewer forwards."""
    ids = clean_ids(model, 3, 6, seed=1)
    kwargs = dict(max_new_tokens=16, return_dict_in_generate=True, block_size=8, steps_per_block=8)
    plain = model.generate(ids, eos_token_id=None, **kwargs)
    eos = int(plain.sequences[0, 6 + 3])  # a token the first row commits at its fourth position
    out = model.generate(ids, eos_token_id=eos, pad_token_id=0, **kwargs)
    whole_block = model.generate(ids, eos_token_id=eos, pad_token_id=0, keep_eos_block=True, **kwargs)
    for row in range(3):
        tokens = plain.sequences[row, 6:].tolist()
        cut = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        assert out.sequences[row, 6 : 6 + len(cut)].tolist() == cut
    assert int(out.nfe[0]) < int(whole_block.nfe[0])


def test_a_criterion_stop_before_an_eos_committed_in_the_same_step_wins(model):
    """One step commits the whole block (threshold 0): the criterion's stop at 3 tokens comes before the EOS at the
    fourth, as in AR."""

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6 + 3, dtype=torch.bool)

    ids, criteria = clean_ids(model, 1, 6), StoppingCriteriaList([StopAt()])
    kwargs = dict(block_size=8, steps_per_block=8, max_new_tokens=8, confidence_threshold=0.0)
    plain = model.generate(ids, eos_token_id=None, **kwargs)[0, 6:].tolist()
    eos = plain[3]
    assert eos not in plain[:3]
    assert model.generate(ids, eos_token_id=eos, stopping_criteria=criteria, **kwargs)[0, 6:].tolist() == plain[:3]
    ar = model.generate(ids, generation_mode="ar", eos_token_id=eos, stopping_criteria=criteria, max_new_tokens=8)
    assert ar.shape[1] == 6 + 3


def test_renormalised_scores_are_log_probabilities_when_sampling(model):
    out = model.generate(
        clean_ids(model, 1, 6), max_new_tokens=4, eos_token_id=None, do_sample=True, top_k=5, renormalize_logits=True,
        return_dict_in_generate=True, output_scores=True, generator=torch.Generator().manual_seed(0), **DIFFUSION,
    )  # fmt: skip
    for scores in out.scores:
        torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(1), atol=1e-5, rtol=0)


def test_custom_criteria_see_the_scores_of_the_committing_step(model):
    seen = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append((input_ids[:, -1].clone(), scores.clone()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = clean_ids(model, 2, 6)
    criteria = StoppingCriteriaList([Record()])
    model.generate(ids, max_new_tokens=8, eos_token_id=None, stopping_criteria=criteria, **DIFFUSION)
    assert sum(len(last) for last, _ in seen) == 2 * 8, "each row once per prefix length, as AR once per token"
    for last, scores in seen:
        assert not (last == 3).any(), "a criterion never sees a mask token"
        assert torch.equal(scores.argmax(-1), last), "greedy: the token is the argmax of the scores it came from"


# --- scores in mask diffusion ----------------------------------------------------------------------------------------


def test_diffusion_scores_are_those_of_the_committing_step(model):
    ids = clean_ids(model, 2, 6)
    steps = []
    out = model.generate(
        ids, max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_scores=True, output_logits=True,
        step_callback=steps.append, **DIFFUSION,
    )  # fmt: skip
    assert len(out.scores) == len(out.logits) == 8 and out.commit_steps.shape == (2, 8)
    forward = torch.zeros(2, dtype=torch.long)
    for step in steps:
        for row in range(2):
            for position in step.committed[row].nonzero()[:, 0].tolist():
                index = 4 * step.block + position
                assert int(out.commit_steps[row, index]) == int(forward[row])
                torch.testing.assert_close(out.logits[index][row], step.logits[row, position].float())
        forward += (step.tokens == 3).any(-1)
    transitions = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    tokens = out.sequences[:, 6:]
    for index in range(8):
        expected = out.scores[index].log_softmax(-1).gather(-1, tokens[:, index, None])[:, 0]
        torch.testing.assert_close(transitions[:, index], expected)
        assert torch.equal(out.scores[index].argmax(-1), tokens[:, index])  # greedy


# --- padding -----------------------------------------------------------------------------------------------------------


def test_the_demo_tokenizer_pads_on_the_left_and_the_batched_call_works(demo):
    model, tokenizer = demo
    texts = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left"
    out = model.generate(**batch, max_new_tokens=16)
    for row, text in enumerate(texts):
        alone = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=16)
        assert tokenizer.decode(out[row, batch.input_ids.shape[1] :], skip_special_tokens=True) == tokenizer.decode(
            alone[0, alone.shape[1] - 16 :], skip_special_tokens=True
        )


# --- the remaining rows, in the modes a stock model does not have ---------------------------------------------------


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar"])
def test_warpers_act_on_each_positions_distribution(model, mode):
    """top_k=1 leaves each position only its most likely token: sampling gives the greedy tokens (in diffusion the
    confidence, read before the warpers, is the same too, so the commit order is)."""
    ids = clean_ids(model, 2, 6)
    kwargs = dict(generation_mode=mode, max_new_tokens=8, eos_token_id=None, **DIFFUSION)
    greedy = model.generate(ids, **kwargs)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, generator=generator, **kwargs), greedy)
    sampled = model.generate(ids, do_sample=True, temperature=5.0, generator=generator, **kwargs)
    assert not torch.equal(sampled, greedy)
    kept = model.generate(ids, renormalize_logits=True, remove_invalid_values=True, **kwargs)
    assert torch.equal(kept, greedy), "renormalising changes no argmax"


@pytest.mark.parametrize("mode", ["mask_diffusion", "mock_ar"])
def test_num_return_sequences_repeats_each_prompt(model, mode):
    ids = clean_ids(model, 2, 6)
    generator = torch.Generator().manual_seed(0)
    out = model.generate(
        ids, generation_mode=mode, max_new_tokens=8, eos_token_id=None, do_sample=True, temperature=3.0,
        num_return_sequences=3, generator=generator, **DIFFUSION,
    )  # fmt: skip
    assert out.shape == (6, 14) and torch.equal(out[:, :6], ids.repeat_interleave(3, 0))
    assert not torch.equal(out[0], out[1])


def test_the_diffusion_loss_is_reproducible_with_a_generator(model):
    ids = clean_ids(model, 2, 12)
    loss = lambda seed: model(ids, labels=ids, generator=torch.Generator().manual_seed(seed)).loss  # noqa: E731
    assert torch.equal(loss(0), loss(0)) and not torch.equal(loss(0), loss(1))
