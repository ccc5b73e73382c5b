"""Generation for TwoTower: mask diffusion, Mock-AR and AR through one `generate`.

Data flows one way: prompt -> `prefill` (cache) -> block loop -> step loop -> committed tokens -> `extend_context`.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import logits_process
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .context_twotower import check_left_padded, check_prompt_ids
from .decoding_twotower import StaticSteps, decode_state
from .defaults_twotower import GENERATION_MODES, MODEL_GENERATION_DEFAULTS, RELEASE_FUNCTION_THRESHOLD
from .defaults_twotower import TWOTOWER_GENERATION_DEFAULTS as TWOTOWER_DEFAULTS
from .sampling_twotower import commit_mask, predict_tokens


logger = logging.get_logger(__name__)


# The GenerationConfig fields this `generate` reads (docs/generation.md, "Controls"). Any other field set to something
# other than its default raises, instead of being ignored; `num_beams` and `use_cache` are checked on their own.
SUPPORTED_FIELDS = frozenset(
    {
        *TWOTOWER_DEFAULTS,
        # lengths, special tokens, outputs
        "max_new_tokens", "max_length", "min_new_tokens", "min_length", "eos_token_id", "pad_token_id",
        "bos_token_id", "return_dict_in_generate", "output_scores", "output_logits", "num_return_sequences",
        "compile_config",
        # stopping
        "max_time", "stop_strings",
        # sampling (transformers' warpers)
        "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
        # transformers' logits processors
        "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
        "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
        "remove_invalid_values", "renormalize_logits", "watermarking_config",
        # bookkeeping
        "transformers_version", "num_beams", "use_cache",
    }
)  # fmt: skip
UNSUPPORTED_GENERATE_ARGUMENTS = (
    "assistant_model", "assistant_tokenizer", "synced_gpus", "negative_prompt_ids", "negative_prompt_attention_mask",
    "past_key_values", "inputs_embeds", "custom_generate",
)  # fmt: skip
# Mask diffusion applies a processor to every masked position of a block at once, which is only defined for those
# acting on one position's distribution by itself (docs/generation.md, "Controls").
POSITIONWISE_PROCESSORS = (
    logits_process.RepetitionPenaltyLogitsProcessor, logits_process.SuppressTokensLogitsProcessor,
    logits_process.SequenceBiasLogitsProcessor,  # single-token sequences only (checked): bad words, biases
    logits_process.InfNanRemoveLogitsProcessor, logits_process.LogitNormalization,
)  # fmt: skip
WARPERS = (
    logits_process.TemperatureLogitsWarper, logits_process.TopKLogitsWarper, logits_process.TopPLogitsWarper,
    logits_process.MinPLogitsWarper, logits_process.TypicalLogitsWarper, logits_process.EpsilonLogitsWarper,
    logits_process.EtaLogitsWarper, logits_process.TopHLogitsWarper,
)  # fmt: skip
# The controls that need the tokens to the left of a position, which mask diffusion has not decided yet.
LEFT_CONTEXT_CONTROLS = (
    "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
    "begin_suppress_tokens", "watermarking_config",
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
    history: tuple[DiffusionStep, ...] | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    commit_steps: torch.LongTensor | None = None


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
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
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

        Transformers' logits processors and stopping criteria work as in a stock model in the AR and Mock-AR modes; in
        mask diffusion those acting on one position's distribution apply to every masked position, and stops are
        checked on each row's committed prefix after every step (docs/generation.md, "Controls").

        Returns the token ids `(B, T + generated)`, or a [`TwoTowerGenerationOutput`] with
        `return_dict_in_generate=True`. `generator` seeds sampling. `step_callback` (mask diffusion) is called with a
        [`DiffusionStep`] after every denoiser step. `max_new_tokens` need not be a multiple of `block_size`: the last
        block is generated whole, then trimmed.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        config, input_ids, attention_mask = self._prepare_generation(inputs, attention_mask, generation_config, kwargs)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"`streamer` supports batch size 1 only, got a batch of {input_ids.shape[0]}.")
        processors = self._processors(config, input_ids, attention_mask, logits_processor, prefix_allowed_tokens_fn)
        # EOS and the length are the row tracker's; the rest (stop strings, time, the caller's) as transformers builds
        # them, checked after every committed token.
        stops = self._get_stopping_criteria(
            _without(config, max_length=None, _eos_token_tensor=None), StoppingCriteriaList(stopping_criteria or []),
            tokenizer,
        )  # fmt: skip
        if config.generation_mode == "mask_diffusion":
            observers = [step_callback] if step_callback is not None else []
            history = [] if config.output_history else None
            if history is not None:
                observers.append(lambda step: history.append(DiffusionStep(**{**step, "logits": None})))
            result = self._generate_mask_diffusion(
                input_ids, attention_mask, config, processors, stops, streamer, generator, observers,
                full_logits=step_callback is not None, custom_stops=bool(stopping_criteria),
            )  # fmt: skip
            result.history = tuple(history) if history is not None else None
        else:
            if step_callback is not None:
                raise ValueError("`step_callback` is only available in `mask_diffusion` mode.")
            result = self._generate_autoregressive(
                input_ids, attention_mask, config, processors, stops, streamer, generator
            )
        if streamer is not None:
            streamer.end()
        return result if config.return_dict_in_generate else result.sequences

    def _processors(self, config, input_ids, attention_mask, logits_processor, prefix_allowed_tokens_fn):
        """Transformers' logits processors for this config. AR and Mock-AR: one list, as a stock model applies it.
        Mask diffusion: `_DiffusionControls`, the position-wise processors and the warpers apart (the confidence is
        read between them), with `min_length` / `min_new_tokens` as the generated count before which EOS is banned at
        a position; anything else is refused by name."""
        model_kwargs = {"attention_mask": attention_mask}
        if config.generation_mode != "mask_diffusion":
            return self._get_logits_processor(
                config, input_ids.shape[1], None, prefix_allowed_tokens_fn, LogitsProcessorList(logits_processor or []),
                input_ids.device, model_kwargs,
            )  # fmt: skip
        why = "it needs the tokens to the left of a position, which mask diffusion decides in parallel"
        refused = [name for name in LEFT_CONTEXT_CONTROLS if getattr(config, name, None) not in (None, 0, False)]
        refused += ["bad_words_ids"] if any(len(w) > 1 for w in config.bad_words_ids or []) else []
        refused += ["sequence_bias"] if any(len(w) > 1 for w in _sequence_bias_keys(config)) else []
        refused += ["prefix_allowed_tokens_fn"] if prefix_allowed_tokens_fn is not None else []
        if refused:
            raise ValueError(
                f"`{refused[0]}` is not supported in `mask_diffusion` mode: {why} (multi-token bad words and biases "
                "likewise). Use `generation_mode='ar'` or `'mock_ar'` (docs/generation.md, 'Controls')."
            )
        if logits_processor:
            raise ValueError(
                "`logits_processor` is not supported in `mask_diffusion` mode: a custom processor expects one "
                "next-token distribution after the whole sequence, while a block's positions are predicted together. "
                "Use the generation config's controls, or `generation_mode='ar'`/`'mock_ar'`."
            )
        length = input_ids.shape[1]
        min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - length)
        built = self._get_logits_processor(
            _without(config, min_length=0, min_new_tokens=None), length, None, None, LogitsProcessorList(),
            input_ids.device,
            {"attention_mask": None if attention_mask is None else attention_mask.repeat_interleave(config.block_size, 0)},
        )  # fmt: skip
        # When sampling, the normalisation transformers puts last goes after the warpers too.
        late = (*WARPERS, logits_process.LogitNormalization) if config.do_sample else WARPERS
        processors = LogitsProcessorList(p for p in built if not isinstance(p, late))
        warpers = LogitsProcessorList(p for p in built if isinstance(p, late))
        for processor in processors:
            if not isinstance(processor, POSITIONWISE_PROCESSORS):  # a guard: the checks above should have said why
                raise ValueError(f"{type(processor).__name__} is not supported in `mask_diffusion` mode.")
        return _DiffusionControls(processors, warpers if config.do_sample else None, min_new)

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
        if pretrained_model_name_or_path is None:  # weights given as a `state_dict`: no folder to read
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
        self._prepare_special_tokens(config, True, device=input_ids.device)
        config.max_length = input_ids.shape[1] + config.max_new_tokens  # what transformers' processors read
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and config.max_length > limit:
            logger.warning_once(
                f"The prompt ({input_ids.shape[1]} tokens) and `max_new_tokens` ({config.max_new_tokens}) reach "
                f"{config.max_length} positions, beyond the model's `max_position_embeddings` ({limit}): quality may "
                "degrade past it."
            )
        if (config.num_return_sequences or 1) > 1:  # as transformers expands the inputs
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        return config, input_ids, attention_mask

    @staticmethod
    def _check_supported(config: TwoTowerGenerationConfig):
        if (config.num_beams or 1) > 1:
            raise ValueError(
                f"`num_beams` must be 1: TwoTower does not implement beam search (got {config.num_beams})."
            )
        if (config.num_return_sequences or 1) > 1 and not config.do_sample:
            raise ValueError(
                f"`num_return_sequences` > 1 (got {config.num_return_sequences}) needs `do_sample=True`: greedy "
                "decoding would return the same sequence each time."
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
        self, input_ids, attention_mask, config, controls, stops, streamer, generator, observers,
        full_logits=False, custom_stops=False,
    ) -> TwoTowerGenerationOutput:  # fmt: skip
        batch_size, device = input_ids.shape[0], input_ids.device
        block_size, steps, mask_id = config.block_size, config.steps_per_block, config.mask_token_id
        processors, warpers, min_new = controls
        eos = torch.tensor(self._eos_ids(config), dtype=torch.long, device=device)
        positions = torch.arange(block_size, device=device)

        tracker = _RowTracker(
            input_ids, config.max_new_tokens, config.pad_token_id, eos, config.keep_eos_block, streamer
        )
        # Per generated position, the step's scores (custom stops receive them) and logits, and the commit order.
        keep_scores = bool(config.output_scores or custom_stops)
        record = None
        if keep_scores or config.output_logits:
            record = _CommitRecord(tracker, keep_scores, bool(config.output_logits), bool(config.output_scores))
        decoder = self._decoder(input_ids, attention_mask, config, keep_behind=False)  # only Mock-AR reads behind
        for block_idx in range(math.ceil(config.max_new_tokens / block_size)):
            block = torch.full((batch_size, block_size), mask_id, dtype=torch.long, device=device)
            # Finished rows hold padding: nothing of theirs is masked, so they commit nothing and count no forward.
            block[tracker.finished] = config.pad_token_id
            stop = _BlockStop(tracker, stops, block_size, mask_id, eos if not config.keep_eos_block else None)
            banned = None
            if min_new > tracker.generated_length and eos.numel():  # EOS is banned before the `min_new`-th token
                early = (tracker.generated_length + positions) < min_new
                banned = torch.zeros(1, block_size, self.config.vocab_size, dtype=torch.bool, device=device)
                banned[0, early[:, None] & torch.isin(torch.arange(self.config.vocab_size, device=device), eos)] = True
            if record is not None:
                record.new_block(batch_size, block_size, self.config.vocab_size)

            for step in range(steps):
                masked = block == mask_id
                active = masked.any(-1)
                num_active = int(active.sum())  # the step's one host sync
                if num_active == 0:
                    break
                t = masked.float().mean(-1)  # each row's fraction still masked
                # The head runs on masked positions only, unless a step callback wants every logit.
                logits = decoder.denoise(block, t, active, num_active, None if full_logits else masked)
                context = torch.cat([tracker.sequences, block], dim=-1) if processors or warpers else None
                pred, confidence, scores = predict_tokens(
                    logits, mask_id, warpers, generator, processors, context, banned
                )
                commit = commit_mask(confidence, masked, step, steps, config.confidence_threshold)
                if observers:
                    seen = DiffusionStep(
                        block=block_idx, step=step, tokens=block, t=t, logits=logits.clone(), committed=commit
                    )
                    for observe in observers:
                        observe(seen)
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

    # ----------------------------------------------------------------------------------------------------------------
    # Mock-AR and AR

    def _generate_autoregressive(
        self, input_ids, attention_mask, config, processors, stops, streamer, generator
    ) -> TwoTowerGenerationOutput:
        mock_ar = config.generation_mode == "mock_ar"
        eos = torch.tensor(self._eos_ids(config), dtype=torch.long, device=input_ids.device)

        tracker = _RowTracker(input_ids, config.max_new_tokens, config.pad_token_id, eos, False, streamer)
        scores_seen = [] if config.output_scores else None
        logits_seen = [] if config.output_logits else None
        decoder = self._decoder(input_ids, attention_mask, config, keep_behind=mock_ar)
        last = input_ids[:, -1:]
        while True:
            if mock_ar:  # the denoiser re-reads the last token from the context one token behind
                logits = decoder.denoise_behind(last)
            else:
                logits = decoder.next_token_logits
            logits = logits.float()
            scores = (
                processors(tracker.sequences, logits.clone()) if processors else logits
            )  # a processor may write in place
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


class _DiffusionControls(NamedTuple):
    """Transformers' controls as mask diffusion applies them (docs/generation.md, "Controls")."""

    processors: LogitsProcessorList  # position-wise, before the confidence is read
    warpers: LogitsProcessorList | None  # sampling only, after it
    min_new: int  # EOS is banned at the positions before this many generated tokens


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
        drawn for the whole batch, so a row's tokens do not depend on which other rows were computed (the
        number of steps, and so how much noise is drawn, still depends on the batch)."""
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
        self.last_real = None  # (B, n) which of the last appended tokens are real
        if streamer is not None:
            streamer.put(input_ids.cpu())

    @property
    def generated_length(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def room(self) -> int:
        return self.max_new_tokens - self.generated_length

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.room <= 0

    def append(
        self, tokens: torch.LongTensor, length: torch.Tensor | None = None, stopped: torch.Tensor | None = None
    ):
        """Commit `(B, n)` tokens: trim past `max_new_tokens`, pad finished rows, end rows at their first EOS, and
        rows `stopped` inside these tokens after their first `length`."""
        tokens = tokens[:, : self.room].clone()
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
        tokens[~real] = self.pad_token_id
        self.num_generated += real.sum(-1)
        self.sequences = torch.cat([self.sequences, tokens], dim=-1)
        self.last_real = real
        if self.streamer is not None:
            self.streamer.put(tokens[0][real[0]].cpu())

    def stop_where(self, rows: torch.Tensor | bool):
        if isinstance(rows, torch.Tensor) and rows.numel():
            self.finished |= rows.to(self.finished.device)

    def output(self, record: "_CommitRecord | None" = None) -> TwoTowerGenerationOutput:
        # Trailing columns that hold only padding of finished rows are dropped, as transformers' generate stops
        # where the last row stops (a lone row ends on its EOS).
        generated = self.sequences[:, self.prompt_length :]
        keep = int(self.num_generated.max()) if self.finished.all() else generated.shape[1]
        sequences = self.sequences[:, : self.prompt_length + keep]
        tokens_per_forward = self.num_generated.float() / self.nfe.clamp_min(1).float()
        output = TwoTowerGenerationOutput(sequences=sequences, nfe=self.nfe, tokens_per_forward=tokens_per_forward)
        if record is not None:
            output.scores, output.logits, output.commit_steps = record.output(keep)
        return output


class _BlockStop:
    """Stopping inside a block of mask diffusion. After every step, each row's committed prefix (its tokens up to the
    first one still masked) is checked: for EOS (transformers' rule; not with `keep_eos_block`) and by the stopping
    criteria, once per prefix length, as AR checks them once per token. A row that meets one keeps its block up to
    and including the stop; the rest becomes padding at once, so the row is not computed again."""

    def __init__(self, tracker: _RowTracker, stops: StoppingCriteriaList, block_size: int, mask_id: int, eos):
        device = tracker.sequences.device
        self.tracker, self.stops, self.mask_id, self.eos = tracker, stops, mask_id, eos
        self.room = min(block_size, tracker.room)
        self.positions = torch.arange(block_size, device=device)
        self.length = torch.full((tracker.sequences.shape[0],), block_size, dtype=torch.long, device=device)
        self.stopped = torch.zeros_like(tracker.finished)
        self.checked = torch.zeros_like(self.length)  # prefix lengths already given to the criteria

    def check(self, block: torch.LongTensor, scores: torch.Tensor | None) -> torch.LongTensor:
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


class _CommitRecord:
    """Mask diffusion's per-token outputs: for each generated position, the processed scores and the raw logits of
    the step that committed it, and the row's forward index then (the commit order)."""

    def __init__(self, tracker: _RowTracker, keep_scores: bool, keep_logits: bool, output_scores: bool):
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
        if self.block_scores is not None:
            self.block_scores[commit] = scores[commit]  # in place: only the committed positions' rows move
        if self.block_logits is not None:
            self.block_logits[commit] = logits[commit].float()
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


def _without(config: GenerationConfig, **values) -> GenerationConfig:
    """A shallow copy of `config` with some attributes replaced (transformers' helpers read it; ours stays intact)."""
    config = copy.copy(config)
    for name, value in values.items():
        setattr(config, name, value)
    return config


def _sequence_bias_keys(config) -> list:
    bias = config.sequence_bias or {}
    return list(bias) if isinstance(bias, dict) else [entry[0] for entry in bias]


__all__ = ["DiffusionStep", "TwoTowerGenerationConfig", "TwoTowerGenerationMixin", "TwoTowerGenerationOutput"]
