"""Generation's per-row bookkeeping, shared by the loops (`generation_loops_twotower`).

- `RowTracker`: the committed tokens of every row, its end (EOS, a stop, the length), padding, NFE and streaming;
- `BlockStop`: stopping inside a block of mask diffusion, checked on each row's committed prefix after every step;
- `CommitRecord`: mask diffusion's per-token scores and logits, from the step that committed each token.
"""

import torch
from transformers import StoppingCriteriaList

from .generation_config_twotower import TwoTowerGenerationOutput
from .metrics_twotower import tokens_per_forward


class RowTracker:
    """Per-row bookkeeping shared by the modes: committed tokens, EOS, padding of finished rows, NFE, streaming."""

    def __init__(self, input_ids, max_new_tokens, pad_token_id, eos, keep_eos_block, streamer):
        self.sequences = input_ids
        self.prompt_length = input_ids.shape[1]
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.eos = eos
        self.keep_eos_block = keep_eos_block
        self.streamer = streamer
        self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.nfe = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.num_generated = torch.zeros_like(self.nfe)  # real tokens per row, EOS included
        self.last_real = None  # (B, n) which of the last appended tokens are real
        if streamer is not None:
            streamer.put(input_ids.cpu())

    @property
    def generated_length(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def room(self) -> int:
        return self.max_new_tokens - self.generated_length

    def append(
        self, tokens: torch.LongTensor, length: torch.Tensor | None = None, stopped: torch.Tensor | None = None
    ):
        """Commit `(B, n)` tokens: trim past `max_new_tokens`, pad finished rows, end rows at their first EOS, and
        rows `stopped` inside these tokens after their first `length`."""
        tokens = tokens[:, : self.room]  # (masked_fill below copies)
        real = ~self.finished[:, None].expand_as(tokens)
        if length is not None:
            real = real & (torch.arange(tokens.shape[1], device=tokens.device) < length[:, None])
            self.finished |= stopped
        if self.eos.numel():
            is_eos = torch.isin(tokens, self.eos) & real
            after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
            if not self.keep_eos_block:
                real &= ~after_eos
            self.finished |= is_eos.any(-1)
        tokens = tokens.masked_fill(~real, self.pad_token_id)
        self.num_generated += real.sum(-1)
        self.sequences = torch.cat([self.sequences, tokens], dim=-1)
        self.last_real = real
        if self.streamer is not None:
            self.streamer.put(tokens[0][real[0]].cpu())

    def stop_where(self, rows: torch.Tensor | bool):
        if isinstance(rows, torch.Tensor) and rows.numel():
            self.finished |= rows.to(self.finished.device)

    def output(self, record: "CommitRecord | None" = None) -> TwoTowerGenerationOutput:
        # Trailing columns that hold only padding of finished rows are dropped, as transformers' generate stops
        # where the last row stops (a lone row ends on its EOS).
        generated = self.sequences[:, self.prompt_length :]
        keep = int(self.num_generated.max()) if self.finished.all() else generated.shape[1]
        sequences = self.sequences[:, : self.prompt_length + keep]
        output = TwoTowerGenerationOutput(
            sequences=sequences,
            nfe=self.nfe,
            tokens_per_forward=tokens_per_forward(self.num_generated, self.nfe),
            num_generated=self.num_generated,
        )
        if record is not None:
            output.scores, output.logits, output.commit_steps = record.output(keep)
        return output


class BlockStop:
    """Stopping inside a block of mask diffusion. After every step, each row's committed prefix (its tokens up to the
    first one still masked) is checked: for EOS (transformers' rule; not with `keep_eos_block`) and by the stopping
    criteria, once per prefix length, as AR checks them once per token. A row that meets one keeps its block up to
    and including the stop; the rest becomes padding at once, so the row is not computed again."""

    def __init__(self, tracker: RowTracker, stops: StoppingCriteriaList, block_size: int, mask_id: int, eos):
        device = tracker.sequences.device
        self.tracker, self.stops, self.mask_id, self.eos = tracker, stops, mask_id, eos
        self.room = min(block_size, tracker.room)
        self.positions = torch.arange(block_size, device=device)
        self.length = torch.full((tracker.sequences.shape[0],), block_size, dtype=torch.long, device=device)
        self.stopped = torch.zeros_like(tracker.finished)
        self.checked = torch.zeros_like(self.length)  # prefix lengths already given to the criteria

    def check(self, block: torch.LongTensor, scores: torch.Tensor | None) -> torch.LongTensor:
        if not self.stops and (self.eos is None or not self.eos.numel()):
            return block  # nothing can stop a row inside this block
        prefix = (block != self.mask_id).long().cumprod(-1).sum(-1).clamp(max=self.room)
        live = ~self.tracker.finished
        if self.eos is not None and self.eos.numel():
            is_eos = torch.isin(block, self.eos) & (self.positions < prefix[:, None]) & live[:, None]
            found = is_eos.any(-1)
            self._stop(found, is_eos.long().argmax(-1) + 1)
        if self.stops:
            for p in range(int(self.checked.min()) + 1, int(prefix.max()) + 1):
                # A row stopped later in its block (an EOS found this step) is still asked up to that stop.
                rows = live & (prefix >= p) & (self.checked < p) & (self.length >= p)
                if not bool(rows.any()):
                    continue
                # The criteria see the rows whose prefix reached `p` (never a mask token), as a batch of their own.
                which = rows.nonzero()[:, 0]
                ids = torch.cat([self.tracker.sequences[which], block[which, :p]], dim=-1)
                hit = torch.zeros_like(rows)
                hit[which] = torch.as_tensor(
                    self.stops(ids, None if scores is None else scores[which, p - 1]), device=rows.device
                )
                self._stop(hit, p)
            self.checked = torch.maximum(self.checked, prefix)
        return block.masked_fill(self.positions >= self.length[:, None], self.tracker.pad_token_id)

    def _stop(self, rows: torch.Tensor, length):
        self.length = torch.where(rows, torch.minimum(self.length, torch.as_tensor(length)), self.length)
        self.stopped |= rows


class CommitRecord:
    """Mask diffusion's per-token outputs: for each generated position, the processed scores and the raw logits of
    the step that committed it, and the row's forward index then (the commit order)."""

    def __init__(self, tracker: RowTracker, keep_scores: bool, keep_logits: bool, output_scores: bool):
        # Scores are kept for custom stopping criteria (they receive them) even when the caller did not ask for them.
        self.tracker, self.keep_scores, self.keep_logits = tracker, keep_scores, keep_logits
        self.output_scores = output_scores
        self.scores, self.logits, self.steps = [], [], []

    def new_block(self, batch_size: int, block_size: int, vocab_size: int):
        device = self.tracker.sequences.device
        new = lambda keep: torch.zeros(batch_size, block_size, vocab_size, device=device) if keep else None  # noqa: E731
        self.block_scores, self.block_logits = new(self.keep_scores), new(self.keep_logits)
        self.block_steps = torch.full((batch_size, block_size), -1, dtype=torch.long, device=device)

    def commit(self, commit: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor):
        # Selected on the device (a boolean index would read the commit count on the host).
        if self.block_scores is not None:
            self.block_scores = torch.where(commit[..., None], scores, self.block_scores)
        if self.block_logits is not None:
            self.block_logits = torch.where(commit[..., None], logits.float(), self.block_logits)
        self.block_steps = torch.where(commit, self.tracker.nfe[:, None], self.block_steps)  # (B, S): small

    def end_block(self):
        real = self.tracker.last_real  # (B, n): the tokens the tracker kept of this block
        width = real.shape[1]
        self.steps.append(self.block_steps[:, :width].masked_fill(~real, -1))
        for kept, block in ((self.scores, self.block_scores), (self.logits, self.block_logits)):
            if block is not None:
                kept.append(block[:, :width].masked_fill(~real[..., None], 0.0))

    def output(self, keep: int):
        as_tuple = lambda kept: tuple(torch.cat(kept, 1)[:, :keep].unbind(1)) if kept else None  # noqa: E731
        return (
            as_tuple(self.scores) if self.output_scores else None,
            as_tuple(self.logits),
            torch.cat(self.steps, 1)[:, :keep],
        )


__all__ = ["BlockStop", "CommitRecord", "RowTracker"]
