"""Generation's loops: mask diffusion, and the autoregressive modes (Mock-AR and AR) (docs/architecture.md,
"Generation").

Data flows one way: prompt -> prefill (decode state) -> block loop -> step loop -> committed tokens -> extension.
The loops decode through a `decoding_twotower.Decoder`, eager or compiled alike: the same two steps over the same
state, compiled or not. Each diffusion step reads one value on the host (whether anything is still masked), each AR
token one (which rows have finished); the commit rule and the row bookkeeping stay on the device.
"""

import math
from collections.abc import Callable
from typing import Protocol

import torch
from transformers import CompileConfig

from .decoding_twotower import Decoder
from .generation_arguments_twotower import eos_ids
from .generation_config_twotower import DiffusionStep, TwoTowerGenerationConfig, TwoTowerGenerationOutput
from .generation_rows_twotower import BlockStop, CommitRecord, RowTracker
from .sampling_twotower import commit_mask, predict_tokens


class GenerationHost(Protocol):
    """What `TwoTowerGenerationMixin` requires of the model it is mixed into (`TwoTowerForDiffusionLM`; the tests'
    mock model implements it too). Every method is documented where the model defines it."""

    config: "TwoTowerConfig"  # noqa: F821 (read: `vocab_size`, `pad_token_id`, `block_size`)
    generation_config: TwoTowerGenerationConfig

    def new_decode_state(self, batch_size, max_length, block_size=None, keep_behind=True, device=None):
        """An empty decode state (`decoding_twotower.TwoTowerDecodeState`)."""

    def prefill(self, input_ids, attention_mask=None, keep_behind=True, max_length=None, state=None):
        """Read left-padded prompts into a decode state."""

    def decode_steps(self, compile_config: CompileConfig | None = None):
        """The two decoding steps, eager or compiled (`decoding_twotower.DecodeSteps`)."""


HOST_METHODS = tuple(name for name, value in vars(GenerationHost).items() if callable(value) and name[0] != "_")


def make_decoder(model, input_ids, attention_mask, config, keep_behind: bool) -> Decoder:
    """Read the prompts into a decode state sized for this call, and return what the loops decode from."""
    compile_config = None
    if config.compile:
        device = input_ids.device.type
        compile_config = config.compile_config or CompileConfig(
            mode="reduce-overhead" if device == "cuda" else "default"
        )
    return Decoder(
        model, input_ids, attention_mask, config.max_new_tokens, config.block_size, keep_behind, compile_config
    )


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
    with make_decoder(model, input_ids, attention_mask, config, keep_behind=False) as decoder:  # only Mock-AR: behind
        for block_idx in range(math.ceil(config.max_new_tokens / block_size)):
            # Finished rows hold padding: nothing of theirs is masked, so they commit nothing and count no forward.
            block = torch.full((batch_size, block_size), mask_id, dtype=torch.long, device=device)
            block = block.masked_fill(tracker.finished[:, None], config.pad_token_id)
            stop = BlockStop(tracker, stops, block_size, mask_id, eos if not config.keep_eos_block else None)
            banned = None
            if min_new > tracker.generated_length and eos.numel():  # EOS is banned before the `min_new`-th token
                early = (tracker.generated_length + positions) < min_new
                banned = (early[:, None] & eos_in_vocab)[None]  # (1, S, V)
            if record is not None:
                record.new_block(batch_size, block_size, vocab_size)

            for step in range(steps):
                masked = block == mask_id
                active = masked.any(-1)
                if not bool(active.any()):  # the step's one read on the host
                    break
                t = masked.float().mean(-1)  # each row's fraction still masked
                logits = decoder.denoise(block, t)
                context = torch.cat([tracker.sequences, block], dim=-1) if processors else None  # warpers read no ids
                pred, confidence, scores = predict_tokens(
                    logits, mask_id, warpers, generator, processors, context, banned
                )
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
            finished = tracker.finished.tolist()  # the block's one read on the host
            if all(finished) or tracker.room <= 0:
                break
            decoder.keep_rows(finished)
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
    last = input_ids[:, -1:]
    with make_decoder(model, input_ids, attention_mask, config, keep_behind=mock_ar) as decoder:
        while True:
            logits = decoder.denoise(last, None, behind=True)[:, -1] if mock_ar else decoder.next_token_logits
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
            finished = tracker.finished.tolist()  # the token's one read on the host
            if all(finished) or tracker.room <= 0:
                break
            decoder.keep_rows(finished)
            last = tracker.sequences[:, -1:]
            decoder.extend(last, keep_behind=mock_ar)
    result = tracker.output()
    kept = result.sequences.shape[1] - input_ids.shape[1]
    result.scores = None if scores_seen is None else tuple(scores_seen[:kept])
    result.logits = None if logits_seen is None else tuple(logits_seen[:kept])
    return result


__all__ = ["GenerationHost", "make_decoder", "run_autoregressive", "run_mask_diffusion"]
