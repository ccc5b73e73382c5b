"""Generation for TwoTower: mask diffusion, Mock-AR and AR through one `generate`.

Data flows one way: prompt -> `prefill` (cache) -> block loop -> step loop -> committed tokens -> `extend_context`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import MaxTimeCriteria, StopStringCriteria
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .context_twotower import check_left_padded, check_prompt_ids
from .decoding_twotower import StaticSteps, decode_state
from .sampling_twotower import commit_mask, predict_tokens


logger = logging.get_logger(__name__)


GENERATION_MODES = ("mask_diffusion", "mock_ar", "ar")

# TwoTower's own generation fields, and the defaults `generate` uses where neither the caller nor the model's
# generation config sets them.
TWOTOWER_DEFAULTS = {
    "generation_mode": "mask_diffusion",
    "block_size": 16,
    "steps_per_block": 16,
    "confidence_threshold": 0.8,
    "mask_token_id": 3,
    "output_history": False,
    "keep_eos_block": False,
    "compile": False,
}
# A model's defaults on top of them: 128 new tokens, greedy.
MODEL_DEFAULTS = {**TWOTOWER_DEFAULTS, "max_new_tokens": 128, "do_sample": False}
# The GenerationConfig fields this `generate` reads. Any other field set to something other than its default raises,
# instead of being ignored; `num_beams`, `num_return_sequences` and `use_cache` are checked on their own.
SUPPORTED_FIELDS = frozenset(
    {
        *TWOTOWER_DEFAULTS,
        # transformers' fields, with their usual meaning
        "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
        "pad_token_id", "bos_token_id", "return_dict_in_generate", "max_time", "stop_strings", "compile_config",
        # bookkeeping
        "transformers_version", "num_beams", "num_return_sequences", "use_cache",
    }
)  # fmt: skip
UNSUPPORTED_GENERATE_ARGUMENTS = (
    "assistant_model", "assistant_tokenizer", "prefix_allowed_tokens_fn", "synced_gpus", "negative_prompt_ids",
    "negative_prompt_attention_mask", "past_key_values", "inputs_embeds", "custom_generate",
)  # fmt: skip


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
        for name in TWOTOWER_DEFAULTS:
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    @staticmethod
    def _get_default_generation_params() -> dict:
        return {**GenerationConfig._get_default_generation_params(), **MODEL_DEFAULTS}

    @classmethod
    def from_model_config(cls, model_config) -> "TwoTowerGenerationConfig":
        """A model's defaults: TwoTower's defaults, 128 new tokens, greedy, and the model's special ids and block size.

        Every value is written out, so that callers who fill in unset knobs (the text-generation pipeline samples by
        default) find them set, and `GenerationConfig.from_pretrained` reads the TwoTower fields back.
        """
        values = dict(MODEL_DEFAULTS)
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
    history; 0 for rows with nothing masked, which the denoiser does not compute); committed: `(B, S)` bool, the
    positions that took their prediction at this step.
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
    tokens_per_forward: `(B,)` generated tokens (up to and including EOS) per forward.
    history: with `output_history=True` in diffusion mode, one [`DiffusionStep`] per denoiser step (without logits).
    """

    sequences: torch.LongTensor | None = None
    nfe: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    history: tuple[DiffusionStep, ...] | None = None


class TwoTowerGenerationMixin(GenerationMixin):
    """`generate` for TwoTower's three modes (docs/architecture.md, "Generation"), plus the release's `generate_*`
    functions, which all go through `generate`."""

    # Mask diffusion computes only rows with something masked (idle rows: a complete block, or finished) and drops
    # finished rows from the cache. Off, every row runs every step (the reference the tests compare with).
    _skip_idle_rows = True

    # ----------------------------------------------------------------------------------------------------------------
    # Entry points

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: TwoTowerGenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tokenizer=None,
        step_callback: Callable[[DiffusionStep], None] | None = None,
        **kwargs,
    ) -> torch.LongTensor | TwoTowerGenerationOutput:
        r"""Generate after left-padded prompts `(B, T)` in one of three modes (`generation_mode`).

        Mask diffusion (default), for each block of `block_size` tokens::

            x = [mask] * S                                   # per row
            for step in range(steps_per_block):
                if nothing in x is masked: break
                logits = denoiser(x, t = masked fraction of the row, context cache)
                pred, conf = argmax (or Gumbel-max sample) of p(x0 | x_t), p(pred)   # mask id excluded
                commit, per row, the k most confident masked positions:
                    k = all masked                          on the last step
                    k = max(#(conf > threshold) or 1, ceil(n / steps_left)) otherwise
            append x; the context tower reads x once        # never recomputes the prefix
            a row is done at its first EOS (later tokens become `pad_token_id`)

        Mock-AR decodes one token per denoiser forward (no time conditioning, the context one token behind); AR is
        the context tower alone with its cache.

        Returns the token ids `(B, T + generated)`, or a [`TwoTowerGenerationOutput`] with
        `return_dict_in_generate=True`. `generator` seeds sampling. `step_callback` (mask diffusion) is called with a
        [`DiffusionStep`] after every denoiser step. `max_new_tokens` need not be a multiple of `block_size`: the last
        block is generated whole, then trimmed.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        config, input_ids, attention_mask = self._prepare_generation(inputs, attention_mask, generation_config, kwargs)
        stopping_criteria = self._prepare_stopping_criteria(config, stopping_criteria, tokenizer)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"`streamer` supports batch size 1 only, got a batch of {input_ids.shape[0]}.")
        result = self._generate(
            input_ids, attention_mask, config, logits_processor, stopping_criteria, streamer, generator, step_callback
        )
        if streamer is not None:
            streamer.end()
        return result if config.return_dict_in_generate else result.sequences

    def _generate(
        self,
        input_ids,
        attention_mask,
        config,
        logits_processor,
        stopping_criteria,
        streamer,
        generator,
        step_callback,
    ) -> "TwoTowerGenerationOutput":
        if config.generation_mode == "mask_diffusion":
            if logits_processor:
                raise ValueError(
                    "`logits_processor` is not supported in `mask_diffusion` mode: the positions of a block are "
                    "predicted jointly, not as one next-token distribution. Use `temperature`/`top_k`/`top_p`."
                )
            observers = [step_callback] if step_callback is not None else []
            history = [] if config.output_history else None
            if history is not None:
                observers.append(lambda step: history.append(DiffusionStep(**{**step, "logits": None})))
            result = self._generate_mask_diffusion(
                input_ids, attention_mask, config, stopping_criteria, streamer, generator, observers,
                full_logits=step_callback is not None,
            )  # fmt: skip
            result.history = tuple(history) if history is not None else None
        else:
            if step_callback is not None:
                raise ValueError("`step_callback` is only available in `mask_diffusion` mode.")
            result = self._generate_autoregressive(
                input_ids, attention_mask, config, logits_processor, stopping_criteria, streamer, generator
            )
        return result

    def generate_mask_diffusion(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int = 128,
        block_size: int = 16,
        steps_per_block: int = 16,
        mask_token_id: int = 3,
        temperature: float = 0.0,
        top_k: int | None = None,
        confidence_threshold: float = 0.9,
        eos_token_id: int | None = None,
        step_callback: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """The release's function: prompt + generated ids. EOS ends generation after the block holding it, which is
        kept whole. `step_callback(block_before_step, logits)` is called at every denoiser step."""
        config = self._release_config(
            "mask_diffusion", max_new_tokens, temperature, top_k, None, eos_token_id,
            block_size=block_size, steps_per_block=steps_per_block, mask_token_id=mask_token_id,
            confidence_threshold=confidence_threshold, keep_eos_block=True,
        )  # fmt: skip
        observer = None if step_callback is None else (lambda step: step_callback(step.tokens, step.logits))
        return self.generate(
            input_ids, generation_config=config, attention_mask=attention_mask, step_callback=observer
        )

    def generate_mock_ar(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """The release's function: the denoiser as an autoregressive model; stops right after EOS."""
        config = self._release_config("mock_ar", max_new_tokens, temperature, top_k, top_p, eos_token_id)
        return self.generate(input_ids, generation_config=config, attention_mask=attention_mask)

    def generate_ar(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """The release's function: the context tower alone (the AR baseline); stops right after EOS."""
        config = self._release_config("ar", max_new_tokens, temperature, top_k, top_p, eos_token_id)
        return self.generate(input_ids, generation_config=config, attention_mask=attention_mask)

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ):
        """At `from_pretrained`: read `generation_config.json` as a `TwoTowerGenerationConfig`; without one, keep the
        defaults built from the model config (the release ships none)."""
        if generation_config is not None:
            self.generation_config = TwoTowerGenerationConfig.from_dict(generation_config.to_dict())
            return
        hub_kwargs = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        try:
            self.generation_config = TwoTowerGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in hub_kwargs if k in kwargs}
            )
        except OSError:
            pass

    # ----------------------------------------------------------------------------------------------------------------
    # Preparation: everything is checked before anything runs

    def _release_config(self, mode, max_new_tokens, temperature, top_k, top_p, eos_token_id, **extra):
        sampling = temperature is not None and temperature > 0
        return TwoTowerGenerationConfig(
            generation_mode=mode,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_k=top_k if sampling else None,
            top_p=top_p if sampling else None,
            eos_token_id=eos_token_id,
            pad_token_id=self.generation_config.pad_token_id,
            **extra,
        )

    def _prepare_generation(self, input_ids, attention_mask, generation_config, kwargs):
        """Check everything and build the generation config before anything runs.

        The config is merged as transformers' `generate` merges it: the caller's values (keywords over
        `generation_config`) win, then the model's `generation_config`, then the defaults (TwoTower's, then
        transformers'). A `max_length` the caller sets, without `max_new_tokens`, counts the prompt.
        """
        for name in UNSUPPORTED_GENERATE_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` is not supported by TwoTower's `generate`.")
        kwargs = {k: v for k, v in kwargs.items() if k not in UNSUPPORTED_GENERATE_ARGUMENTS}
        if input_ids is None:
            raise ValueError("`input_ids` is required: TwoTower generates after a prompt.")
        check_prompt_ids(input_ids)

        provided = generation_config is not None
        config = (
            TwoTowerGenerationConfig.from_dict(generation_config.to_dict()) if provided else TwoTowerGenerationConfig()
        )
        caller_set = {k for k, v in [*kwargs.items(), *(vars(config).items() if provided else [])] if v is not None}
        defaults = config._get_default_generation_params()
        config.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        config.update(**defaults, defaults_only=True)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"Unknown arguments to `generate`: {sorted(unused)}.")

        # Lengths as transformers reads them: `max_length` counts the prompt; `max_new_tokens` wins when both are set.
        if "max_length" in caller_set and "max_new_tokens" not in caller_set:
            if config.max_length <= input_ids.shape[-1]:
                raise ValueError(
                    f"`max_length` ({config.max_length}) counts the prompt, which already has {input_ids.shape[-1]} "
                    "tokens: raise it, or set `max_new_tokens` to count generated tokens only."
                )
            config.max_new_tokens = config.max_length - input_ids.shape[-1]
        elif "max_length" in caller_set:
            logger.warning(
                f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` (={config.max_length}) are set; "
                "`max_new_tokens` takes precedence."
            )
        config.update(**{k: defaults[k] for k in (*TWOTOWER_DEFAULTS, "max_new_tokens")}, defaults_only=True)
        self._check_supported(config)
        attention_mask = check_left_padded(input_ids, self._prepare_attention_mask(input_ids, attention_mask, config))
        if ((input_ids == config.mask_token_id) & attention_mask.bool()).any():
            raise ValueError(
                f"`input_ids` contains the mask token id {config.mask_token_id}; a prompt must be clean text."
            )
        if config.pad_token_id is None:
            eos = self._eos_ids(config)
            config.pad_token_id = eos[0] if eos else self.config.pad_token_id
        return config, input_ids, attention_mask

    @staticmethod
    def _check_supported(config: TwoTowerGenerationConfig):
        if (config.num_beams or 1) > 1:
            raise ValueError(
                f"`num_beams` must be 1: TwoTower does not implement beam search (got {config.num_beams})."
            )
        if (config.num_return_sequences or 1) > 1:
            raise ValueError(
                f"`num_return_sequences` must be 1 (got {config.num_return_sequences}); repeat the prompt instead."
            )
        defaults = config._get_default_generation_params()
        for name, value in vars(config).items():
            if not name.startswith("_") and name not in SUPPORTED_FIELDS and value not in (None, defaults.get(name)):
                raise ValueError(f"`{name}` is not supported by TwoTower's `generate` (got {value!r}).")
        if config.use_cache is False:
            raise ValueError("`use_cache=False` is not supported: TwoTower always generates from its context cache.")
        if config.output_history and config.generation_mode != "mask_diffusion":
            raise ValueError("`output_history` is only available in `mask_diffusion` mode.")

    def _prepare_attention_mask(self, input_ids, attention_mask, config) -> torch.Tensor | None:
        """Without a mask, infer left padding from `pad_token_id` as transformers does: where the pad id occurs in the
        inputs and differs from EOS. Only leading pad ids are padding (a left-padded row); later ones are text."""
        if attention_mask is not None:
            return attention_mask
        pad, batched = config.pad_token_id, input_ids.shape[0] > 1
        if pad is None:
            if batched:
                logger.warning(
                    "The attention mask and the pad token id were not set, with a batched input. As a consequence, you "
                    "may observe unexpected behavior. Please pass your input's `attention_mask` to obtain reliable "
                    "results."
                )
            return None
        if not bool((input_ids == pad).any()):
            return None
        if pad in self._eos_ids(config):
            if batched:
                logger.warning_once(
                    "The attention mask is not set with a batched input, and cannot be inferred from input because pad "
                    "token is same as eos token. As a consequence, you may observe unexpected behavior. Please pass "
                    "your input's `attention_mask` to obtain reliable results."
                )
            return None
        return (input_ids != pad).long().cummax(dim=-1).values

    @staticmethod
    def _eos_ids(config) -> list[int]:
        eos = config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @staticmethod
    def _prepare_stopping_criteria(config, stopping_criteria, tokenizer) -> StoppingCriteriaList:
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("`stop_strings` needs the `tokenizer` argument of `generate`.")
            criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
        return criteria

    @staticmethod
    def _warpers(config) -> LogitsProcessorList | None:
        """Temperature / top-k / top-p as transformers' own warpers; None means greedy."""
        if not config.do_sample:
            return None
        warpers = LogitsProcessorList()
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k > 0:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        return warpers

    # ----------------------------------------------------------------------------------------------------------------
    # Mask diffusion

    def _decoder(self, input_ids, attention_mask, config, keep_behind: bool) -> "_CacheDecoder | _StateDecoder":
        """Read the prompts, and return what the loops decode from: the growing cache (eager), or with `compile=True`
        the static decode state and its compiled steps (docs/architecture.md, "Static decoding")."""
        cache = self.prefill(input_ids, attention_mask, keep_behind=keep_behind)
        if not config.compile:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            return _CacheDecoder(self, cache, rows, self._skip_idle_rows)
        block_size = config.block_size
        round_up = lambda n: -(-n // block_size) * block_size  # noqa: E731
        max_length = round_up(input_ids.shape[1] + round_up(config.max_new_tokens))
        state = decode_state(self, cache, max_length, block_size, keep_behind)
        compile_config = config.compile_config or CompileConfig(
            mode="reduce-overhead" if self.device.type == "cuda" else "default"
        )
        return _StateDecoder(StaticSteps(self, state, compile_config), cache.next_token_logits)

    def _generate_mask_diffusion(
        self, input_ids, attention_mask, config, stopping_criteria, streamer, generator, observers, full_logits=False
    ) -> TwoTowerGenerationOutput:
        batch_size = input_ids.shape[0]
        block_size, steps, mask_id = config.block_size, config.steps_per_block, config.mask_token_id
        warpers = self._warpers(config)
        eos = torch.tensor(self._eos_ids(config), dtype=torch.long, device=input_ids.device)

        tracker = _RowTracker(
            input_ids, config.max_new_tokens, config.pad_token_id, eos, config.keep_eos_block, streamer
        )
        decoder = self._decoder(input_ids, attention_mask, config, keep_behind=False)  # only Mock-AR reads behind
        for block_idx in range(math.ceil(config.max_new_tokens / block_size)):
            block = torch.full((batch_size, block_size), mask_id, dtype=torch.long, device=input_ids.device)
            # Finished rows hold padding: nothing of theirs is masked, so they commit nothing and count no forward.
            block[tracker.finished] = config.pad_token_id

            for step in range(steps):
                masked = block == mask_id
                active = masked.any(-1)
                num_active = int(active.sum())  # the step's one host sync
                if num_active == 0:
                    break
                t = masked.float().mean(-1)  # each row's fraction still masked
                # The head runs on masked positions only, unless a step callback wants every logit.
                positions = None if full_logits else masked
                logits = decoder.denoise(block, t, active, num_active, positions)
                pred, confidence = predict_tokens(logits, mask_id, warpers, generator)
                commit = commit_mask(confidence, masked, step, steps, config.confidence_threshold)
                if observers:
                    record = DiffusionStep(
                        block=block_idx, step=step, tokens=block, t=t, logits=logits.clone(), committed=commit
                    )
                    for observe in observers:
                        observe(record)
                block = torch.where(commit, pred, block)
                tracker.nfe += active

            tracker.append(block)
            tracker.stop_where(stopping_criteria(tracker.sequences, None))
            if tracker.done:
                break
            decoder.leave(tracker.finished)
            decoder.extend(block)  # the context tower reads the block once
        return tracker.output()

    # ----------------------------------------------------------------------------------------------------------------
    # Mock-AR and AR

    def _generate_autoregressive(
        self, input_ids, attention_mask, config, logits_processor, stopping_criteria, streamer, generator
    ) -> TwoTowerGenerationOutput:
        mock_ar = config.generation_mode == "mock_ar"
        processors = LogitsProcessorList(logits_processor or [])
        warpers = self._warpers(config)
        if warpers is not None:
            processors.extend(warpers)
        eos = torch.tensor(self._eos_ids(config), dtype=torch.long, device=input_ids.device)

        tracker = _RowTracker(input_ids, config.max_new_tokens, config.pad_token_id, eos, False, streamer)
        decoder = self._decoder(input_ids, attention_mask, config, keep_behind=mock_ar)
        last = input_ids[:, -1:]
        while True:
            if mock_ar:  # the denoiser re-reads the last token from the context one token behind
                logits = decoder.denoise_behind(last)
            else:
                logits = decoder.next_token_logits
            scores = processors(tracker.sequences, logits) if processors else logits
            if warpers is None:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
            tracker.nfe += ~tracker.finished
            tracker.append(token[:, None])
            tracker.stop_where(stopping_criteria(tracker.sequences, scores))
            if tracker.done:
                break
            last = tracker.sequences[:, -1:]
            decoder.extend(last, keep_behind=mock_ar)
        return tracker.output()


class _CacheDecoder:
    """Eager decoding over the growing `TwoTowerCache`: the denoiser computes only rows with something masked, and
    finished rows leave the cache, so that neither tower computes for them again (`skip_idle_rows`)."""

    def __init__(self, model, cache, rows: torch.LongTensor, skip_idle_rows: bool):
        self.model, self.cache, self.skip_idle_rows = model, cache, skip_idle_rows
        self.in_cache = rows  # the batch row of every cache row

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.cache.next_token_logits

    def denoise(self, block, t, active, num_active: int, positions) -> torch.Tensor:
        """The denoiser's logits `(B, L, V)` for the whole batch, computed only for the `active` rows (something of
        their block still masked); the other rows' logits are 0, and nothing reads them. The sampling noise is still
        drawn for the whole batch, so a row's tokens do not depend on which other rows were computed."""
        model, in_cache = self.model, self.in_cache
        if not self.skip_idle_rows or num_active == block.shape[0] == len(in_cache):
            return model.denoise_step(block, self.cache, t, positions=positions)
        places = active[in_cache].nonzero()[:, 0]  # the active rows' places in the cache
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
        if self.skip_idle_rows and finished[self.in_cache].any():
            keep = (~finished[self.in_cache]).nonzero()[:, 0]
            self.cache.keep_rows(keep)
            self.in_cache = self.in_cache[keep]

    def extend(self, tokens: torch.LongTensor, keep_behind: bool = False):
        self.model.extend_context(self.cache, tokens[self.in_cache], keep_behind=keep_behind)


class _StateDecoder:
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


class _RowTracker:
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
        if streamer is not None:
            streamer.put(input_ids.cpu())

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.sequences.shape[1] - self.prompt_length >= self.max_new_tokens

    def append(self, tokens: torch.LongTensor):
        """Commit `(B, n)` tokens: trim past `max_new_tokens`, pad finished rows, end rows at their first EOS."""
        room = self.max_new_tokens - (self.sequences.shape[1] - self.prompt_length)
        tokens = tokens[:, :room].clone()
        real = ~self.finished[:, None].expand_as(tokens)
        if self.eos.numel():
            is_eos = torch.isin(tokens, self.eos) & real
            after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
            if not self.keep_eos_block:
                real &= ~after_eos
            self.finished |= is_eos.any(-1)
        tokens[~real] = self.pad_token_id
        self.num_generated += real.sum(-1)
        self.sequences = torch.cat([self.sequences, tokens], dim=-1)
        if self.streamer is not None:
            self.streamer.put(tokens[0][real[0]].cpu())

    def stop_where(self, rows: torch.Tensor | bool):
        if isinstance(rows, torch.Tensor) and rows.numel():
            self.finished |= rows.to(self.finished.device)

    def output(self) -> TwoTowerGenerationOutput:
        # Trailing columns that hold only padding of finished rows are dropped, as transformers' generate stops
        # where the last row stops (a lone row ends on its EOS).
        generated = self.sequences[:, self.prompt_length :]
        keep = int(self.num_generated.max()) if self.finished.all() else generated.shape[1]
        sequences = self.sequences[:, : self.prompt_length + keep]
        tokens_per_forward = self.num_generated.float() / self.nfe.clamp_min(1).float()
        return TwoTowerGenerationOutput(
            sequences=sequences,
            nfe=self.nfe,
            tokens_per_forward=tokens_per_forward,
        )


__all__ = ["DiffusionStep", "TwoTowerGenerationConfig", "TwoTowerGenerationMixin", "TwoTowerGenerationOutput"]
