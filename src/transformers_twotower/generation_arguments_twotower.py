"""`generate`'s arguments, checked and prepared before anything runs (docs/generation.md, "Controls").

The generation config is merged as transformers merges it, and transformers builds the logits processors and the
stopping criteria; what is TwoTower's own is which controls each mode accepts: AR and Mock-AR take a stock model's,
mask diffusion those acting on one position's distribution by itself (`DiffusionControls`). Anything else is refused
by name instead of being ignored.
"""

import copy
from typing import NamedTuple

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList
from transformers.generation import logits_process
from transformers.utils import logging

from .context_twotower import check_left_padded, check_prompt_ids, check_token_ids
from .defaults_twotower import TWOTOWER_GENERATION_DEFAULTS
from .generation_config_twotower import TwoTowerGenerationConfig


logger = logging.get_logger(__name__)

# The GenerationConfig fields this `generate` reads (docs/generation.md, "Controls"). Any other field set to something
# other than its default raises, instead of being ignored; `num_beams` and `use_cache` are checked on their own.
SUPPORTED_FIELDS = frozenset(
    {
        *TWOTOWER_GENERATION_DEFAULTS,
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


class DiffusionControls(NamedTuple):
    """Transformers' controls as mask diffusion applies them (docs/generation.md, "Controls")."""

    processors: LogitsProcessorList  # position-wise, before the confidence is read
    warpers: LogitsProcessorList | None  # sampling only, after it
    min_new: int  # EOS is banned at the positions before this many generated tokens


class GenerationArguments(GenerationMixin):
    """The argument preparation `TwoTowerGenerationMixin.generate` runs first: everything is checked before anything
    runs."""

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
        check_token_ids(input_ids, self.config.vocab_size)

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
        config.update(
            **{k: defaults[k] for k in (*TWOTOWER_GENERATION_DEFAULTS, "max_new_tokens")}, defaults_only=True
        )
        self._check_supported(config)
        attention_mask = check_left_padded(input_ids, self._prepare_attention_mask(input_ids, attention_mask, config))
        if ((input_ids == config.mask_token_id) & attention_mask.bool()).any():
            raise ValueError(
                f"`input_ids` contains the mask token id {config.mask_token_id}; a prompt must be clean text."
            )
        if config.pad_token_id is None:
            eos = eos_ids(config)
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
        if pad in eos_ids(config):
            if batched:
                logger.warning_once(
                    "The attention mask is not set with a batched input, and cannot be inferred from input because pad "
                    "token is same as eos token. As a consequence, you may observe unexpected behavior. Please pass "
                    "your input's `attention_mask` to obtain reliable results."
                )
            return None
        return (input_ids != pad).long().cummax(dim=-1).values

    def _processors(self, config, input_ids, attention_mask, logits_processor, prefix_allowed_tokens_fn):
        """Transformers' logits processors for this config. AR and Mock-AR: one list, as a stock model applies it.
        Mask diffusion: `DiffusionControls`, the position-wise processors and the warpers apart (the confidence is
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
            replaced(config, min_length=0, min_new_tokens=None), length, None, None, LogitsProcessorList(),
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
        return DiffusionControls(processors, warpers if config.do_sample else None, min_new)


def eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def replaced(config: GenerationConfig, **values) -> GenerationConfig:
    """A shallow copy of `config` with some attributes replaced (transformers' helpers read it; ours stays intact)."""
    config = copy.copy(config)
    for name, value in values.items():
        setattr(config, name, value)
    return config


def _sequence_bias_keys(config) -> list:
    bias = config.sequence_bias or {}
    return list(bias) if isinstance(bias, dict) else [entry[0] for entry in bias]


__all__ = ["DiffusionControls", "GenerationArguments", "eos_ids"]
