"""`generate` for TwoTower: mask diffusion, Mock-AR and AR through one entry point (docs/generation.md).

The generation config and outputs live in `generation_config_twotower`, argument preparation in
`generation_arguments_twotower`, the loops in `generation_loops_twotower` and their per-row bookkeeping in
`generation_rows_twotower`. This module holds the mixin the model inherits: `generate`, the release's functions, and
reading `generation_config.json` at `from_pretrained`.
"""

import inspect
from collections.abc import Callable

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .defaults_twotower import (
    GENERATION_MODES,
    MODEL_GENERATION_DEFAULTS,
    RELEASE_FUNCTION_DEFAULTS,
)
from .generation_arguments_twotower import GenerationArguments, replaced
from .generation_config_twotower import DiffusionStep, TwoTowerGenerationConfig, TwoTowerGenerationOutput
from .generation_loops_twotower import HOST_METHODS, run_autoregressive, run_mask_diffusion


class TwoTowerGenerationMixin(GenerationArguments):
    """`generate` for TwoTower's three modes (docs/architecture.md, "Generation"), plus the release's `generate_*`
    functions, which all go through `generate`. The model it is mixed into provides `GenerationHost`'s methods
    (`generation_loops_twotower`): `new_decode_state`, `prefill` and `decode_steps`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in HOST_METHODS if not callable(getattr(cls, name, None))]
        if missing:
            raise TypeError(f"{cls.__name__} mixes in TwoTowerGenerationMixin without {missing} (see GenerationHost).")

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
                logits = denoiser(x, t = masked fraction of the row, decode state)
                pred, conf = argmax (or Gumbel-max sample) of p(x0 | x_t), p(pred)   # mask id excluded
                commit, per row, the k most confident masked positions:
                    k = all masked                          on the last step
                    k = max(#(conf > threshold) or 1, ceil(n / steps_left)) otherwise
            append x; the context tower reads x once        # never recomputes the prefix
            a row is done at its first EOS (later tokens become `pad_token_id`)

        Mock-AR decodes one token per denoiser forward (no time conditioning, the context one token behind); AR is
        the context tower alone with its decode state.

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
            replaced(config, max_length=None, _eos_token_tensor=None), StoppingCriteriaList(stopping_criteria or []),
            tokenizer,
        )  # fmt: skip
        if config.generation_mode == "mask_diffusion":
            history = [] if config.output_history else None
            result = run_mask_diffusion(
                self, input_ids, attention_mask, config, processors, stops, streamer, generator, step_callback,
                history, custom_stops=bool(stopping_criteria),
            )  # fmt: skip
            result.history = tuple(history) if history is not None else None
        else:
            if step_callback is not None:
                raise ValueError("`step_callback` is only available in `mask_diffusion` mode.")
            result = run_autoregressive(
                self, input_ids, attention_mask, config, processors, stops, streamer, generator
            )
        if streamer is not None:
            streamer.end()
        return result if config.return_dict_in_generate else result.sequences

    def generate_release(
        self,
        generation_mode: str,
        input_ids: torch.LongTensor,
        max_new_tokens: int = MODEL_GENERATION_DEFAULTS["max_new_tokens"],
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        block_size: int | None = None,
        steps_per_block: int | None = None,
        mask_token_id: int | None = None,
        confidence_threshold: float | None = None,
        step_callback: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.LongTensor:
        """The release's generation functions, as one: prompt + generated ids. `generate_mask_diffusion`,
        `generate_mock_ar` and `generate_ar` are this function with the mode given; past `max_new_tokens`, their
        arguments are keywords. `temperature > 0` samples (with `top_k` / `top_p`), else greedy.

        Mask diffusion follows the release's EOS rule: generation ends after the block holding EOS, which is kept
        whole; `step_callback(block_before_step, logits)` is called at every denoiser step. Its fields default to the
        release function's: block 16, 16 steps, mask id 3, threshold 0.9. The autoregressive modes stop right after
        EOS and refuse mask diffusion's fields.
        """
        diffusion = dict(
            block_size=block_size, steps_per_block=steps_per_block, mask_token_id=mask_token_id,
            confidence_threshold=confidence_threshold, step_callback=step_callback,
        )  # fmt: skip
        sampling = temperature is not None and temperature > 0
        fields = dict(
            generation_mode=generation_mode, max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_k=top_k if sampling else None,
            top_p=top_p if sampling else None, eos_token_id=eos_token_id,
            pad_token_id=self.generation_config.pad_token_id,
        )  # fmt: skip
        if generation_mode == "mask_diffusion":
            given = {k: diffusion[k] for k in RELEASE_FUNCTION_DEFAULTS if diffusion[k] is not None}
            fields.update(RELEASE_FUNCTION_DEFAULTS, keep_eos_block=True, **given)
        else:
            given = sorted(name for name, value in diffusion.items() if value is not None)
            if given:
                raise ValueError(f"{given} belong to `mask_diffusion` mode, not to {generation_mode!r}.")
        observer = None if step_callback is None else (lambda step: step_callback(step.tokens, step.logits))
        return self.generate(
            input_ids, generation_config=TwoTowerGenerationConfig(**fields), attention_mask=attention_mask,
            step_callback=observer,
        )  # fmt: skip

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


def _release_alias(mode: str):
    """The release's function `generate_<mode>`: `generate_release` with the mode given."""

    def alias(self, input_ids, *args, **kwargs):
        return self.generate_release(mode, input_ids, *args, **kwargs)

    signature = inspect.signature(TwoTowerGenerationMixin.generate_release)
    alias.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "generation_mode"]
    )
    alias.__name__ = alias.__qualname__ = f"generate_{mode}"
    alias.__doc__ = f"`generate_release({mode!r}, ...)`: the release's `generate_{mode}` (see `generate_release`)."
    return alias


for _mode in GENERATION_MODES:
    setattr(TwoTowerGenerationMixin, f"generate_{_mode}", _release_alias(_mode))


__all__ = ["DiffusionStep", "TwoTowerGenerationConfig", "TwoTowerGenerationMixin", "TwoTowerGenerationOutput"]
