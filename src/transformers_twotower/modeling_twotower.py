"""Nemotron-Labs-TwoTower: a frozen autoregressive context tower and a block-diffusion denoiser tower.

`TwoTowerForDiffusionLM` wires the two towers together (docs/architecture.md):

- `context_tower` (`context_twotower.py`): the frozen Nemotron-H backbone with its head; writes the decode state (`TwoTowerDecodeState`);
- `denoiser_tower` (`denoiser_twotower.py`): the trained backbone with adaLN-single, joint attention and seeded Mamba;
  its head is `lm_head`;

plus the module plumbing, the inference building blocks generation is made of, and `forward` (the context tower's
logits, or the masked-diffusion loss of `training_twotower.py`). Checkpoints keep the release's layout
(`layout_twotower.py`).
"""

from pathlib import Path

import torch
from torch import nn
from transformers import CompileConfig
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from .backbone_twotower import TwoTowerPreTrainedModel
from .card_twotower import model_card
from .configuration_twotower import TwoTowerConfig
from .context_twotower import TwoTowerContextTower, TwoTowerDecodeState, check_left_padded, check_token_ids
from .decoding_twotower import DecodeSteps
from .denoiser_twotower import TwoTowerDenoiser
from .generation_config_twotower import TwoTowerGenerationConfig
from .generation_twotower import TwoTowerGenerationMixin
from .layout_twotower import checkpoint_conversion_mapping, register_checkpoint_layout
from .training_twotower import masked_diffusion_forward


logger = logging.get_logger(__name__)

# Checkpoints keep the release's names and layout (`layout_twotower`): `from_pretrained` applies these rules and
# `save_pretrained` reverts them, so what it writes is the release's layout again.
register_checkpoint_layout(TwoTowerConfig.model_type)

# LoRA's default targets for `model_type="twotower"`: the denoiser's attention and Mamba projections, never the frozen
# context tower (PEFT reads a string as a regular expression over module names).
DENOISER_LORA_TARGETS = r"denoiser_tower\.layers\.\d+\.mixer\.(q_proj|k_proj|v_proj|o_proj|in_proj|out_proj)"
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:  # PEFT is optional
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["twotower"] = DENOISER_LORA_TARGETS


def two_tower_device_map(context_device, denoiser_device) -> dict[str, str | int | torch.device]:
    """A `device_map` placing the context tower (with its head) on `context_device` and the denoiser tower and its
    head on `denoiser_device`, as the release ran them on two GPUs:
    `TwoTowerForDiffusionLM.from_pretrained(path, device_map=two_tower_device_map("cuda:0", "cuda:1"))`.
    The denoiser reads the context's K/V and Mamba states across devices."""
    return {"context_tower": context_device, "denoiser_tower": denoiser_device, "lm_head": denoiser_device}


class TwoTowerForDiffusionLM(TwoTowerPreTrainedModel, TwoTowerGenerationMixin):
    """Nemotron-Labs-TwoTower.

    - `model(input_ids)` returns the context tower's next-token logits (like the release's `forward`).
    - `model(input_ids, labels=...)` returns the block-wise masked-diffusion loss.
    - `prefill`, `extend_context` and `denoise_step` are the inference building blocks generation is made of.
    - `generate(...)` runs mask diffusion, Mock-AR or AR (`TwoTowerGenerationMixin`).

    `base_model` is the denoiser tower (`TwoTowerDenoiser`); `get_input_embeddings` / `get_output_embeddings` are the
    denoiser's embeddings and head (`lm_head`); the context tower's are `context_tower.embeddings` and
    `context_tower.lm_head`.
    """

    generation_config_class = TwoTowerGenerationConfig
    # With `tie_word_embeddings`, each head is tied to its own tower's embeddings (the context tower ties its own).
    _tied_weights_keys = {"lm_head.weight": "denoiser_tower.embeddings.weight"}
    # Tensor parallelism for both heads, as transformers' causal LMs shard theirs (the towers have no plan yet).
    _tp_plan = {"lm_head": "colwise_gather_output", "context_tower.lm_head": "colwise_gather_output"}
    # The loss averages over the masked tokens itself (not over labels): Trainer must not renormalise it with its
    # label count (`num_items_in_batch`), only average it over gradient-accumulation steps and processes.
    accepts_loss_kwargs = False

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config)
        self.context_tower = TwoTowerContextTower(config)
        self.denoiser_tower = TwoTowerDenoiser(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.freeze_context_tower:
            self.freeze_context_tower()

    # ----------------------------------------------------------------------------------------------------------------
    # Module plumbing

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, plus `AutoModel` in `auto_map` (`add_auto_model`) and a Hub model card
        (`README.md`, see `card_twotower.model_card`) when the folder has none: a card written by hand or by a
        conversion script is kept."""
        add_auto_model(self.config)
        super().save_pretrained(save_directory, *args, **kwargs)
        card = Path(save_directory) / "README.md"
        if kwargs.get("is_main_process", True) and not card.exists():
            model_card(self.config, self.generation_config).save(card)

    def freeze_context_tower(self):
        self.context_tower.requires_grad_(False)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # Loading replaces every parameter with a fresh, trainable one: freeze the context tower again afterwards.
        loading_info = TwoTowerPreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        # `save_pretrained` writes the release's layout whatever layout was read: transformers keeps only the rules a
        # load used, so a model read from stacked experts would otherwise be written back stacked.
        model._weight_conversions = checkpoint_conversion_mapping()
        if model.config.freeze_context_tower:
            model.freeze_context_tower()
        return loading_info

    def train(self, mode: bool = True):
        """The context tower is frozen and always runs in eval mode (no dropout, never gradient-checkpointed)."""
        super().train(mode)
        self.context_tower.eval()
        if mode:
            adapted = sorted(
                {
                    "context_tower." + name.split(".lora_")[0]
                    for name, _ in self.context_tower.named_modules()
                    if ".lora_" in name
                }
            )
            if adapted:
                logger.warning(
                    f"Adapters on the frozen context tower never train (it runs without gradient): {adapted[:6]}"
                    f"{' ...' if len(adapted) > 6 else ''}. Target the denoiser instead, e.g. the default "
                    f"`LoraConfig()` targets `{DENOISER_LORA_TARGETS}`."
                )
        return self

    def get_input_embeddings(self):
        """The denoiser tower's embeddings (the context tower's: `context_tower.embeddings`)."""
        return self.denoiser_tower.embeddings

    def set_input_embeddings(self, value):
        self.denoiser_tower.embeddings = value

    def get_output_embeddings(self):
        """The denoiser tower's head (the context tower's: `context_tower.lm_head`)."""
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """The towers share one vocabulary: transformers resizes the denoiser's embeddings and head, then the context
        tower's embeddings and head are resized to the same size by the same code."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.context_tower._resize_token_embeddings(embeddings.weight.shape[0], mean_resizing=mean_resizing)
        return embeddings

    # ----------------------------------------------------------------------------------------------------------------
    # Inference building blocks

    def new_decode_state(
        self, batch_size: int, max_length: int, block_size: int | None = None, keep_behind: bool = True, device=None
    ) -> TwoTowerDecodeState:
        """An empty decode state for `batch_size` rows and up to `max_length` context tokens, with a block region of
        `block_size` (default: the config's) for the denoiser, on `device` (default: the context tower's embeddings')."""
        device = self.context_tower.embeddings.weight.device if device is None else device
        return TwoTowerDecodeState(
            self, batch_size, max_length, block_size or self.config.block_size, keep_behind, device
        )

    def decode_steps(self, compile_config: CompileConfig | None = None) -> DecodeSteps:
        """The decoding steps generation runs (`decoding_twotower`), eager or compiled with `compile_config`."""
        return DecodeSteps(self, compile_config)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        keep_behind: bool = True,
        max_length: int | None = None,
        state: TwoTowerDecodeState | None = None,
    ) -> TwoTowerDecodeState:
        """Run the context tower over left-padded prompts `(B, T)` into a decode state and return it; its
        `next_token_logits` `(B, V)` are the prediction after the prompt.

        The state holds up to `max_length` context tokens (default: the prompt plus the generation config's
        `max_new_tokens`, rounded up to a block), or pass an empty `state`. With `keep_behind` the prompt is read as
        the release reads it, in two passes (all but the last token, then the last token), so that the state also
        holds the Mamba states one token behind (Mock-AR reads them); without, in one pass.
        """
        mask = check_left_padded(input_ids, attention_mask)
        check_token_ids(input_ids, self.config.vocab_size)
        if state is None:
            block = self.config.block_size
            room = self.generation_config.max_new_tokens or block
            max_length = max_length or TwoTowerDecodeState.length_for(input_ids.shape[1], room, block)
            state = self.new_decode_state(input_ids.shape[0], max_length, block, keep_behind, input_ids.device)
        if state.batch_size != input_ids.shape[0] or state.num_written:
            raise ValueError(f"`state` must be an empty decode state for {input_ids.shape[0]} rows.")
        if keep_behind and not state.keep_behind:
            raise ValueError("`keep_behind=True` needs a state built with `keep_behind=True`.")
        state.check_room(input_ids.shape[1], "A prompt")
        steps = self.decode_steps()  # eager: the prompt's shape changes from call to call
        # With `keep_behind`, the release's two passes: all but the last token, then the last token alone.
        cut = input_ids.shape[1] - 1 if keep_behind else input_ids.shape[1]
        for columns, behind in ((slice(0, cut), False), (slice(cut, None), keep_behind)):
            if input_ids[:, columns].shape[1]:
                padding = None if bool(mask[:, columns].all()) else mask[:, columns]
                steps.extend(state, input_ids[:, columns], behind, padding, "A prompt")
        return state

    @torch.no_grad()
    def extend_context(
        self, state: TwoTowerDecodeState, token_ids: torch.LongTensor, keep_behind: bool = True
    ) -> TwoTowerDecodeState:
        """Append committed tokens `(B, L)` to the context (the prefix is never recomputed) and return the state. One
        token keeps the Mamba states behind it when the state keeps them (unless `keep_behind=False`)."""
        if token_ids.dim() != 2 or token_ids.shape[0] != state.batch_size or token_ids.shape[1] == 0:
            raise ValueError(
                f"`token_ids` must have shape (batch={state.batch_size}, length >= 1), got {tuple(token_ids.shape)}."
            )
        check_token_ids(token_ids, self.config.vocab_size, "token_ids")
        self.decode_steps().extend(state, token_ids, keep_behind)
        return state

    def denoise_step(
        self, block_ids: torch.LongTensor, state: TwoTowerDecodeState, t: torch.Tensor | None, behind: bool = False
    ) -> torch.Tensor:
        """The denoiser's fp32 logits `(B, L, V)` for noisy blocks `(B, L)` after the state's context.

        `t` is `(B,)` (each row's masked fraction) or None for no time conditioning. `behind=True` reads the context
        one token behind (Mock-AR; the state must keep those states and end on a one-token extension or prefill)."""
        if block_ids.dim() != 2 or block_ids.shape[0] != state.batch_size:
            raise ValueError(
                f"`block_ids` must have shape (batch={state.batch_size}, length), got {tuple(block_ids.shape)}."
            )
        check_token_ids(block_ids, self.config.vocab_size, "block_ids")
        if t is not None and t.shape != (block_ids.shape[0],):
            raise ValueError(f"`t` must have shape ({block_ids.shape[0]},) or be None, got {tuple(t.shape)}.")
        if behind and not state.behind_ready:
            raise ValueError(
                "`behind=True` reads the Mamba states one token behind: the state must keep them (`keep_behind=True`) "
                "and end on a one-token extension or a prefill that kept them."
            )
        return self.decode_steps().denoise(state, block_ids, t, behind)

    # ----------------------------------------------------------------------------------------------------------------
    # Training: block-wise masked diffusion

    def diffusion_loss(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return masked_diffusion_forward(self, input_ids, labels, attention_mask, noise_mask, generator)[:3]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        noise_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Without `labels`: the context tower's next-token logits `(B, T, V)`, fp32 (no gradient).
        With `labels`: the masked-diffusion `loss` and the denoiser's logits (see `diffusion_loss`); it draws its noise
        from `generator` (or pass `noise_mask`), so it is reproducible with a seeded generator. For the exact
        autoregressive log-likelihood of a text, use `log_likelihood`.

        `output_hidden_states` returns the hidden states of the tower that made the logits (the embeddings, then every
        layer; the last one before `norm_f`). `logits_to_keep` keeps the last `n` positions' logits (0: all) or the
        positions a 1-D tensor names, as in Nemotron-H. `use_cache` is accepted and returns no cache: `generate`
        keeps its own (`prefill`). Without `labels`, `output_attentions` (eager attention) and
        `output_router_logits` return the context tower's, recorded as Nemotron-H records them; with `labels`,
        `output_router_logits` returns the denoiser's (`(B * N', n_routed_experts)` per MoE layer, `N'` the sequence
        padded to whole blocks). `output_attentions`, `output_hidden_states` and `output_router_logits` default to the
        config's flags, as in transformers' MoE models (the config's `output_attentions` only without `labels`).
        `return_dict=False` returns a tuple.
        """
        ignored = sorted(name for name, value in kwargs.items() if value is not None and value is not False)
        if ignored:
            raise ValueError(f"TwoTower's `forward` does not support {ignored}.")
        if labels is not None and output_attentions:
            raise ValueError(
                "`output_attentions` returns the context tower's attentions (without `labels`); the diffusion loss "
                "does not record them."
            )
        # An explicit argument wins over the config's flag; the towers are always told (they would read the flag).
        # The config's `output_attentions` applies without `labels` only (the loss records no attentions).
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        if labels is not None:
            loss, logits, _, hidden_states, router_logits = masked_diffusion_forward(
                self, input_ids, labels, attention_mask, noise_mask, generator, output_hidden_states,
                output_router_logits,
            )  # fmt: skip
            return MoeCausalLMOutputWithPast(
                loss=loss, logits=logits, hidden_states=hidden_states, router_logits=router_logits
            )
        with torch.no_grad():
            outputs = self.context_tower(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                output_router_logits=output_router_logits,
            )  # fmt: skip
            hidden = outputs.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.context_tower.next_token_logits(hidden[:, keep])
        return MoeCausalLMOutputWithPast(
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None) if output_attentions else None,
            router_logits=getattr(outputs, "router_logits", None) if output_router_logits else None,
        )

    @torch.no_grad()
    def log_likelihood(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The exact autoregressive log-likelihood of each token under the context tower (the frozen backbone):
        `(B, T - 1)` fp32, entry `t` is `log p(input_ids[:, t + 1] | input_ids[:, : t + 1])`; 0 where position `t`
        is left padding (the first real token has no context).
        Sum a row for the log-likelihood of its text given its first token (evaluation builds on it; the diffusion
        loss of `forward(labels=...)` is a bound on another quantity and changes with the noise drawn)."""
        logits = self(input_ids, attention_mask=attention_mask).logits[:, :-1]
        log_probs = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        if attention_mask is not None:
            log_probs = log_probs.masked_fill(attention_mask[:, :-1] == 0, 0.0)  # no real context yet
        return log_probs


TwoTowerForDiffusionLM.register_for_auto_class("AutoModelForCausalLM")


def add_auto_model(config: TwoTowerConfig):
    """Name `TwoTowerForDiffusionLM` for `AutoModel` too in the `auto_map` a saved folder gets, beside
    `AutoModelForCausalLM` (transformers writes one auto class per model class). `AutoModel.from_pretrained(folder,
    trust_remote_code=True)` then returns the whole model, as the installed package's registration does: neither
    tower is a model by itself (the context tower alone is a plain Nemotron-H, `--context-tower` writes it)."""
    entry = f"{TwoTowerForDiffusionLM.__module__.rpartition('.')[2]}.{TwoTowerForDiffusionLM.__name__}"
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": entry}


__all__ = ["TwoTowerForDiffusionLM", "TwoTowerPreTrainedModel", "add_auto_model", "two_tower_device_map"]
