"""Generation's loops: mask diffusion, and the autoregressive modes (Mock-AR and AR) (docs/architecture.md,
"Generation").

Data flows one way: prompt -> `prefill` (cache) -> block loop -> step loop -> committed tokens -> `extend_context`.
Eager, the loops call the model only through `GenerationHost` and decode from the growing cache (`CacheDecoder`);
with `compile=True` they decode from the static decode state and its compiled steps (`StateDecoder`), which
`decoding_twotower` builds from `TwoTowerForDiffusionLM`'s towers and heads.
"""

import math
from collections.abc import Callable
from typing import Protocol

import torch
from transformers import CompileConfig

from .context_twotower import TwoTowerCache
from .decoding_twotower import StaticSteps, decode_state
from .generation_arguments_twotower import eos_ids
from .generation_config_twotower import DiffusionStep, TwoTowerGenerationConfig, TwoTowerGenerationOutput
from .generation_rows_twotower import BlockStop, CommitRecord, RowTracker
from .sampling_twotower import commit_mask, predict_tokens


class GenerationHost(Protocol):
    """What `TwoTowerGenerationMixin` requires of the model it is mixed into (`TwoTowerForDiffusionLM`; the tests'
    mock model implements it too) for eager generation. Every method is documented where the model defines it;
    `compile=True` also needs the model's `device`, towers and heads (`decoding_twotower`)."""

    config: "TwoTowerConfig"  # noqa: F821 (read: `vocab_size`, `pad_token_id`, `max_position_embeddings`)
    generation_config: TwoTowerGenerationConfig

    def prefill(self, input_ids, attention_mask=None, keep_behind: bool = True) -> TwoTowerCache:
        """Read left-padded prompts into a new cache."""

    def extend_context(self, cache: TwoTowerCache, token_ids, keep_behind: bool = True) -> TwoTowerCache:
        """Append committed tokens to the cache."""

    def denoise_step(self, block_ids, cache: TwoTowerCache, t, behind=False, rows=None, positions=None):
        """The denoiser's fp32 logits for noisy blocks after the cached context."""


HOST_METHODS = tuple(name for name, value in vars(GenerationHost).items() if callable(value) and name[0] != "_")


class CacheDecoder:
    """Eager decoding over the growing `TwoTowerCache`: the denoiser computes only rows with something masked, and
    finished rows leave the cache, so that neither tower computes for them again."""

    def __init__(self, model: GenerationHost, cache: TwoTowerCache, rows: torch.LongTensor):
        self.model, self.cache = model, cache
        self.in_cache = rows  # the batch row of every cache row

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.cache.next_token_logits

    def denoise(self, block, t, active, num_active: int, positions) -> torch.Tensor:
        """The denoiser's logits `(B, L, V)` for the whole batch, computed only for the `active` rows (something of
        their block still masked); the other rows' logits are 0, and nothing reads them. The sampling noise is still
        drawn for the whole batch, so a row's tokens do not depend on which other rows were computed (the
        number of steps, and so how much noise is drawn, still depends on the batch)."""
        model, in_cache = self.model, self.in_cache
        if num_active == block.shape[0] == len(in_cache):
            return model.denoise_step(block, self.cache, t, positions=positions)
        places = active[in_cache].nonzero()[:, 0]  # the active rows' places in the cache (a host sync)
        rows = in_cache[places]
        computed = model.denoise_step(
            block[rows], self.cache, t[rows], rows=None if len(places) == len(in_cache) else places,
            positions=None if positions is None else positions[rows],
        )  # fmt: skip
        logits = computed.new_zeros(block.shape[0], *computed.shape[1:])
        logits[rows.to(logits.device)] = computed
        return logits

    def denoise_behind(self, last: torch.LongTensor) -> torch.Tensor:
        return self.model.denoise_step(last, self.cache, None, behind=True)[:, -1]

    def leave(self, finished: torch.Tensor):
        """Finished rows leave the cache."""
        if finished[self.in_cache].any():
            keep = (~finished[self.in_cache]).nonzero()[:, 0]
            self.cache.keep_rows(keep)
            self.in_cache = self.in_cache[keep]

    def extend(self, tokens: torch.LongTensor, keep_behind: bool = False):
        self.model.extend_context(self.cache, tokens[self.in_cache], keep_behind=keep_behind)


class StateDecoder:
    """Decoding over the static decode state: every row runs every step (the shapes never change), each step one
    compiled graph. Token inputs are made contiguous: a column sliced from the growing sequences has a stride that
    changes every step, and a compiled graph is specialised to its inputs' strides."""

    def __init__(self, steps: StaticSteps, next_token_logits: torch.Tensor):
        self.steps, self.next_token_logits = steps, next_token_logits

    def denoise(self, block, t, active, num_active: int, positions) -> torch.Tensor:
        return self.steps.denoise(block.contiguous(), t)

    def denoise_behind(self, last: torch.LongTensor) -> torch.Tensor:
        return self.steps.denoise(last.contiguous(), None, behind=True)[:, -1]

    def leave(self, finished: torch.Tensor):
        pass

    def extend(self, tokens: torch.LongTensor, keep_behind: bool = False):
        self.next_token_logits = self.steps.extend(tokens.contiguous(), keep_behind)


def make_decoder(model, input_ids, attention_mask, config, keep_behind: bool) -> CacheDecoder | StateDecoder:
    """Read the prompts, and return what the loops decode from: the growing cache (eager), or with `compile=True`
    the static decode state and its compiled steps (docs/architecture.md, "Static decoding")."""
    cache = model.prefill(input_ids, attention_mask, keep_behind=keep_behind)
    if not config.compile:
        return CacheDecoder(model, cache, torch.arange(input_ids.shape[0], device=input_ids.device))
    block_size = config.block_size
    round_up = lambda n: -(-n // block_size) * block_size  # noqa: E731
    max_length = round_up(input_ids.shape[1] + round_up(config.max_new_tokens))
    state = decode_state(model, cache, max_length, block_size, keep_behind)
    compile_config = config.compile_config or CompileConfig(
        mode="reduce-overhead" if model.device.type == "cuda" else "default"
    )
    return StateDecoder(StaticSteps(model, state, compile_config), cache.next_token_logits)


def run_mask_diffusion(
    model: GenerationHost, input_ids, attention_mask, config, controls, stops, streamer, generator,
    step_callback: Callable[[DiffusionStep], None] | None = None, history: list | None = None,
    custom_stops: bool = False,
) -> TwoTowerGenerationOutput:  # fmt: skip
    """Mask diffusion (`TwoTowerGenerationMixin.generate` documents the loop). `controls` is a `DiffusionControls`;
    `history`, when a list, receives every step without its logits."""
    batch_size, device = input_ids.shape[0], input_ids.device
    block_size, steps, mask_id = config.block_size, config.steps_per_block, config.mask_token_id
    processors, warpers, min_new = controls
    vocab_size = model.config.vocab_size
    eos = torch.tensor(eos_ids(config), dtype=torch.long, device=device)
    positions = torch.arange(block_size, device=device)
    eos_in_vocab = torch.isin(torch.arange(vocab_size, device=device), eos)  # (V,) for `min_new`'s ban

    tracker = RowTracker(input_ids, config.max_new_tokens, config.pad_token_id, eos, config.keep_eos_block, streamer)
    # Per generated position, the step's scores (custom stops receive them) and logits, and the commit order.
    keep_scores = bool(config.output_scores or custom_stops)
    record = None
    if keep_scores or config.output_logits:
        record = CommitRecord(tracker, keep_scores, bool(config.output_logits), bool(config.output_scores))
    decoder = make_decoder(model, input_ids, attention_mask, config, keep_behind=False)  # only Mock-AR reads behind
    for block_idx in range(math.ceil(config.max_new_tokens / block_size)):
        block = torch.full((batch_size, block_size), mask_id, dtype=torch.long, device=device)
        # Finished rows hold padding: nothing of theirs is masked, so they commit nothing and count no forward.
        block[tracker.finished] = config.pad_token_id
        stop = BlockStop(tracker, stops, block_size, mask_id, eos if not config.keep_eos_block else None)
        banned = None
        if min_new > tracker.generated_length and eos.numel():  # EOS is banned before the `min_new`-th token
            early = (tracker.generated_length + positions) < min_new
            banned = torch.zeros(1, block_size, vocab_size, dtype=torch.bool, device=device)
            banned[0, early[:, None] & eos_in_vocab] = True
        if record is not None:
            record.new_block(batch_size, block_size, vocab_size)

        for step in range(steps):
            masked = block == mask_id
            active = masked.any(-1)
            num_active = int(active.sum())  # read on the host every step (the eager decoder may sync again)
            if num_active == 0:
                break
            t = masked.float().mean(-1)  # each row's fraction still masked
            # The head runs on masked positions only; a step callback sees the logits at every position.
            logits = decoder.denoise(block, t, active, num_active, None if step_callback is not None else masked)
            context = torch.cat([tracker.sequences, block], dim=-1) if processors else None  # warpers read no ids
            pred, confidence, scores = predict_tokens(logits, mask_id, warpers, generator, processors, context, banned)
            commit = commit_mask(confidence, masked, step, steps, config.confidence_threshold)
            if step_callback is not None or history is not None:
                seen = dict(block=block_idx, step=step, tokens=block, t=t, committed=commit)
                if step_callback is not None:
                    step_callback(DiffusionStep(**seen, logits=logits.clone()))
                if history is not None:
                    history.append(DiffusionStep(**seen))
            block = torch.where(commit, pred, block)
            if record is not None:
                record.commit(commit, scores, logits)
            tracker.nfe += active
            block = stop.check(block, None if record is None else record.block_scores)

        tracker.append(block, stop.length, stop.stopped)
        if record is not None:
            record.end_block()
        if tracker.done:
            break
        decoder.leave(tracker.finished)
        decoder.extend(block)  # the context tower reads the block once
    return tracker.output(record)


def run_autoregressive(
    model: GenerationHost, input_ids, attention_mask, config, processors, stops, streamer, generator
) -> TwoTowerGenerationOutput:
    """AR (the context tower's next-token logits) and Mock-AR (the denoiser re-reading the last token from the
    context one token behind), one token per forward, with transformers' processors applied as a stock model does."""
    mock_ar = config.generation_mode == "mock_ar"
    eos = torch.tensor(eos_ids(config), dtype=torch.long, device=input_ids.device)

    tracker = RowTracker(input_ids, config.max_new_tokens, config.pad_token_id, eos, False, streamer)
    scores_seen = [] if config.output_scores else None
    logits_seen = [] if config.output_logits else None
    decoder = make_decoder(model, input_ids, attention_mask, config, keep_behind=mock_ar)
    last = input_ids[:, -1:]
    while True:
        logits = (decoder.denoise_behind(last) if mock_ar else decoder.next_token_logits).float()
        scores = processors(tracker.sequences, logits.clone()) if processors else logits  # may write in place
        if config.do_sample:
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(-1)
        if scores_seen is not None:
            scores_seen.append(scores.clone())
        if logits_seen is not None:
            logits_seen.append(logits.clone())
        tracker.nfe += ~tracker.finished
        tracker.append(token[:, None])
        tracker.stop_where(stops(tracker.sequences, scores) if stops else False)
        if tracker.done:
            break
        last = tracker.sequences[:, -1:]
        decoder.extend(last, keep_behind=mock_ar)
    result = tracker.output()
    kept = result.sequences.shape[1] - input_ids.shape[1]
    result.scores = None if scores_seen is None else tuple(scores_seen[:kept])
    result.logits = None if logits_seen is None else tuple(logits_seen[:kept])
    return result


__all__ = ["GenerationHost", "run_autoregressive", "run_mask_diffusion"]
