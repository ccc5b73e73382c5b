"""TwoTower's generation config and what `generate` returns (docs/generation.md).

- `TwoTowerGenerationConfig`: transformers' `GenerationConfig` plus TwoTower's fields (defaults: `defaults_twotower`).
- `DiffusionStep`: one denoiser step of mask diffusion, as `step_callback` and `output_history` see it.
- `TwoTowerGenerationOutput`: the sequences with NFE and tokens per forward, and transformers' optional outputs.
"""

import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import ModelOutput

from .defaults_twotower import GENERATION_MODES, MODEL_GENERATION_DEFAULTS, TWOTOWER_GENERATION_DEFAULTS


class TwoTowerGenerationConfig(GenerationConfig):
    r"""
    [`GenerationConfig`] for TwoTower, saved in `generation_config.json`. On top of the usual `max_new_tokens`,
    `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, `pad_token_id`, `return_dict_in_generate`:

    generation_mode (`str`, defaults to `"mask_diffusion"`):
        `"mask_diffusion"` (blocks filled in parallel by the denoiser), `"mock_ar"` (the denoiser decoding one token
        at a time) or `"ar"` (the context tower alone, i.e. the original backbone).
    block_size (`int`, defaults to 16):
        Tokens per diffusion block.
    steps_per_block (`int`, defaults to 16):
        The most denoiser steps spent on one block; the last one commits whatever is still masked.
    confidence_threshold (`float`, defaults to 0.8):
        A masked position is committed when `p(prediction) > confidence_threshold` (at least one per step). Values in
        `(1, 2)` mean "never confident" (one token per step, or the even share the step budget forces); values below
        0 or from 2 on are rejected as mistakes.
    mask_token_id (`int`, defaults to 3):
        The mask token.
    output_history (`bool`, defaults to `False`):
        With `return_dict_in_generate=True`, also return every diffusion step as a [`DiffusionStep`] (block before the
        step, `t`, what was committed; no logits).
    keep_eos_block (`bool`, defaults to `False`):
        The release's EOS rule for mask diffusion: a row ends after the block that holds its EOS, and that block is
        returned whole, tokens after EOS included. By default (transformers' rule) what follows EOS is padding.
    compile (`bool`, defaults to `False`):
        Decode from the static decode state (fixed-address buffers for both towers) with its two step functions
        compiled with `fullgraph=True`, with transformers' `compile_config` if set (a [`CompileConfig`]); by default
        `mode="reduce-overhead"` on CUDA (each step one CUDA graph) and inductor elsewhere. The first call compiles
        (about a minute on a CPU for a small model); the compiled steps and the state are kept on the model.
    """

    def __init__(self, **kwargs):
        # Unset (None) unless given: `generate` then takes the model's value, or TwoTower's default.
        for name in TWOTOWER_GENERATION_DEFAULTS:
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    @staticmethod
    def _get_default_generation_params() -> dict:
        return {**GenerationConfig._get_default_generation_params(), **MODEL_GENERATION_DEFAULTS}

    @classmethod
    def from_model_config(cls, model_config) -> "TwoTowerGenerationConfig":
        """A model's defaults: TwoTower's defaults, 128 new tokens, greedy, and the model's special ids and block size.

        Every value is written out, so that callers who fill in unset knobs (the text-generation pipeline samples by
        default) find them set, and `GenerationConfig.from_pretrained` reads the TwoTower fields back.
        """
        values = dict(MODEL_GENERATION_DEFAULTS)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "block_size"):
            if getattr(model_config, name, None) is not None:
                values[name] = getattr(model_config, name)
        return cls(**values)

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None):
        super().validate(strict=strict, user_set_attributes=user_set_attributes)
        if self.generation_mode is not None and self.generation_mode not in GENERATION_MODES:
            raise ValueError(f"`generation_mode` must be one of {GENERATION_MODES}, got {self.generation_mode!r}.")
        for name in ("block_size", "steps_per_block", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        threshold = self.confidence_threshold
        if threshold is not None and (
            not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0.0 <= threshold < 2.0
        ):
            raise ValueError(
                f"`confidence_threshold` must be a probability in [0, 1] (values in (1, 2) mean 'one token per "
                f"step'), got {threshold!r}."
            )
        if self.mask_token_id is not None and (not isinstance(self.mask_token_id, int) or self.mask_token_id < 0):
            raise ValueError(f"`mask_token_id` must be a non-negative integer, got {self.mask_token_id!r}.")
        if self.do_sample and self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0 when `do_sample=True`, got {self.temperature}.")


@dataclass
class DiffusionStep(ModelOutput):
    """One denoiser step of mask diffusion, as `step_callback` and `output_history` see it.

    block: index of the block; step: index of the step in the block; tokens: `(B, S)` the block before the step;
    t: `(B,)` each row's masked fraction; logits: `(B, S, V)` the denoiser's logits at every position (None in the
    history; 0 for rows that finished in an earlier block and left the decode state; a row whose block is full but
    still in the state is computed, and nothing reads its logits); committed: `(B, S)` bool, the positions that took
    their prediction at this step.
    """

    block: int | None = None
    step: int | None = None
    tokens: torch.LongTensor | None = None
    t: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    committed: torch.BoolTensor | None = None


@dataclass
class TwoTowerGenerationOutput(ModelOutput):
    """
    sequences: `(B, prompt + generated)` token ids; after a row's EOS, `pad_token_id`.
    nfe: `(B,)` model forwards that predicted tokens for each row (denoiser forwards in the diffusion and Mock-AR
        modes, context-tower forwards in AR mode).
    num_generated: `(B,)` each row's generated tokens: up to and including the EOS or the token a stop ended it on
        (with `keep_eos_block`, its whole last block); what follows is padding.
    tokens_per_forward: `(B,)` `num_generated` per forward (`metrics_twotower.tokens_per_forward`).
    history: with `output_history=True` in diffusion mode, one [`DiffusionStep`] per denoiser step (without logits).
    scores: with `output_scores=True`, one `(B, V)` tensor per generated position: the processed scores the token was
        chosen from (in mask diffusion, at the step that committed it). As transformers' `scores`, so
        `compute_transition_scores(sequences, scores)` works. After a row's end, 0 in mask diffusion.
    logits: with `output_logits=True`, the same for the raw logits.
    commit_steps: in mask diffusion with `output_scores` or `output_logits`, `(B, generated)`: the row's forward
        (0-based) that committed each token, i.e. the order in which the tokens were revealed; -1 after a row's end.
    """

    sequences: torch.LongTensor | None = None
    nfe: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    num_generated: torch.LongTensor | None = None
    history: tuple[DiffusionStep, ...] | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    commit_steps: torch.LongTensor | None = None


__all__ = ["DiffusionStep", "TwoTowerGenerationConfig", "TwoTowerGenerationOutput"]
