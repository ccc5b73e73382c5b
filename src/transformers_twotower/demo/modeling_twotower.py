"""Nemotron-Labs-TwoTower: a frozen autoregressive Nemotron-H context tower and a block-diffusion denoiser tower.

Both towers are transformers' Nemotron-H. What TwoTower changes lives in four places, named as in ARCHITECTURE.md:

1. adaLN-single time conditioning: `TwoTowerTimestepEmbedder`, `t_block`, `scale_shift_tables`, and
   `TwoTowerDenoiserBlock` (which puts the modulation before or after the norm depending on the layer type);
2. layer-aligned joint attention over the context K/V plus the block: `TwoTowerAttention.joint_forward`;
3. context-seeded Mamba: `TwoTowerMamba2Mixer.seeded_forward`;
4. the denoiser's own head: `TwoTowerForDiffusionLM.lm_head`.

The context tower writes a `TwoTowerCache`; the denoiser reads it through a `DenoiserContext`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.nemotron_h.modeling_nemotron_h import (
    MIXER_TYPES,
    NemotronHAttention,
    NemotronHBlock,
    NemotronHMamba2Mixer,
    NemotronHModel,
    NemotronHPreTrainedModel,
    NemotronHRMSNorm,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    eager_attention_forward,
    mamba2_chunk_scan,
)
from transformers.utils import logging

from .cache_twotower import DenoiserContext, TwoTowerCache, additive_mask, check_left_padded
from .configuration_twotower import TwoTowerConfig
from .generation_twotower import TwoTowerGenerationConfig, TwoTowerGenerationMixin


logger = logging.get_logger(__name__)

# The release stores one module per expert; transformers' Nemotron-H stacks them into 3-D tensors when loading (and
# splits them again when saving). Reuse exactly those rules; Nemotron-H's `backbone.` -> `model.` rename does not
# apply to TwoTower's `context_tower.` / `denoiser_tower.` keys.
register_checkpoint_conversion_mapping(
    "twotower",
    [rule for rule in get_checkpoint_conversion_mapping("nemotron_h") if isinstance(rule, WeightConverter)],
    overwrite=True,
)


# LoRA's default targets for `model_type="twotower"`: the denoiser's attention and Mamba projections, never the frozen
# context tower (PEFT reads a string as a regular expression over module names).
DENOISER_LORA_TARGETS = r"denoiser_tower\.layers\.\d+\.mixer\.(q_proj|k_proj|v_proj|o_proj|in_proj|out_proj)"
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:  # PEFT is optional
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["twotower"] = DENOISER_LORA_TARGETS


class TwoTowerMamba2Mixer(NemotronHMamba2Mixer):
    """Nemotron-H's Mamba-2 mixer with the release's `dt` clamp and a seeded scan: a block that continues from a
    given Mamba state. The denoiser runs it from the context's state (and writes nothing back); the context tower runs
    it to append a committed block to its cache."""

    def __init__(self, config: TwoTowerConfig, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        # transformers clamps dt from below at `time_step_min`; the release clamps with `time_step_limit` ([0, inf]).
        self.time_step_limit = tuple(config.time_step_limit)

    def forward(self, hidden_states, cache_params=None, attention_mask=None, context_state=None, **kwargs):
        """Nemotron-H's forward, except for two seeded cases:

        - `context_state=(conv_history, ssm_state)`: the denoiser's scan from a context's state;
        - several tokens appended to a cache that already holds a state: the context tower extending by a block.

        Everything goes through the module call, so Accelerate's hooks (device placement, offloading) fire.
        """
        if context_state is not None:
            return self.seeded_forward(hidden_states, *context_state)[0]
        if cache_params is not None and hidden_states.shape[1] > 1 and cache_params.has_previous_state(self.layer_idx):
            conv_state = cache_params.get_conv_state(self.layer_idx)
            ssm_state = cache_params.get_recurrent_state(self.layer_idx)
            hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
            out, new_conv_state, new_ssm_state = self.seeded_forward(hidden_states, conv_state[..., 1:], ssm_state)
            conv_state.copy_(new_conv_state)  # in place: the cache's tensors keep their addresses
            ssm_state.copy_(new_ssm_state)
            return out
        return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)

    @force_accelerate_hooks("conv1d")  # the conv weight is read directly, not through `conv1d`'s forward
    def seeded_forward(
        self, hidden_states: torch.Tensor, conv_history: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the mixer over a block that continues a sequence whose Mamba state is given.

        hidden_states: (B, L, H); conv_history: (B, conv_dim, K - 1), the last raw xBC inputs before the block;
        ssm_state: (B, heads, hd, N). Returns the output (B, L, H) and the state after the block: the last K raw xBC
        inputs (B, conv_dim, K) and the SSM state (B, heads, hd, N), fp32.
        """
        batch_size, length, _ = hidden_states.shape
        gate, xBC, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )

        # 1. Causal conv over [history | block]; keep the block's outputs. The context's states may live on another
        # device (the context tower's): they move to this layer.
        history = conv_history.to(device=xBC.device, dtype=xBC.dtype)
        conv_inputs = torch.cat([history, xBC.transpose(1, 2)], dim=-1)  # (B, conv_dim, K - 1 + L)
        xBC = causal_conv1d_fn(
            conv_inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation
        )
        xBC = xBC[..., -length:].transpose(1, 2)  # (B, L, conv_dim)
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        x = x.float().reshape(batch_size, length, self.num_heads, self.head_dim)
        B = B.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size)
        C = C.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size)

        # 2. SSM scan in fp32. The scan is linear in its state: scan(x; h0) = scan(x; 0) + h0 decayed and read by C.
        # So the chunked kernel always starts from zero (it has been reported wrong with an initial state and a
        # block shorter than its chunk) and the given state enters exactly, in closed form.
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (B, L, heads)
        A = -torch.exp(self.A_log.float())  # (heads,)
        y, zero_start_state = mamba2_chunk_scan(
            x.contiguous(),
            dt.contiguous(),
            A,
            B.contiguous(),
            C.contiguous(),
            chunk_size=self.chunk_size,
            D=self.D.float(),
            return_final_states=True,
        )  # (B, L, heads, hd), (B, heads, hd, N)
        h0 = ssm_state.to(device=x.device, dtype=torch.float32)
        decay = torch.exp(torch.cumsum(dt * A, dim=1))  # (B, L, heads): decay of h0 up to and including step t
        C_heads = C.repeat_interleave(self.num_heads // self.n_groups, dim=2)  # (B, L, heads, N)
        y = y + torch.einsum("blhn,bhpn->blhp", C_heads, h0) * decay[..., None]
        final_state = zero_start_state + decay[:, -1, :, None, None] * h0

        # 3. Gated group norm, output projection.
        y = self.norm(y.reshape(batch_size, length, -1), gate)
        out = self.out_proj(y.to(hidden_states.dtype))
        return out, conv_inputs[..., -self.conv_kernel_size :], final_state


class TwoTowerAttention(NemotronHAttention):
    """Nemotron-H attention (no positional encoding), plus the denoiser's joint attention over context + block."""

    def forward(
        self, hidden_states, attention_mask=None, past_key_values=None, context_kv=None, num_blocks=1, **kwargs
    ):
        """Nemotron-H's attention; with `context_kv=(keys, values)`, the denoiser's joint attention (returns
        `(output, None)` either way)."""
        if context_kv is None:
            return super().forward(
                hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
            )
        return self.joint_forward(hidden_states, *context_kv, attention_mask, num_blocks), None

    def joint_forward(
        self,
        hidden_states: torch.Tensor,
        context_keys: torch.Tensor,
        context_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_blocks: int = 1,
    ) -> torch.Tensor:
        """Queries from the block(s); keys/values = [this layer's context K/V | the blocks' own K/V], no causal mask.

        hidden_states: (B * nb, S, H), context K/V: (B, kv_heads, T, hd), attention_mask: additive, broadcastable to
        (B, heads, nb * S, T + nb * S), or None for "every key visible".
        """
        rows, length, _ = hidden_states.shape
        hidden_states = hidden_states.reshape(rows // num_blocks, num_blocks * length, -1)  # (B, nb * S, H)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)

        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, heads, nb * S, hd)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, kv_heads, nb * S, hd)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        # The context K/V (written by the context tower, perhaps on another device) move to this layer.
        key = torch.cat([context_keys.to(key.device, key.dtype), key], dim=2)  # (B, kv_heads, T + nb * S, hd)
        value = torch.cat([context_values.to(value.device, value.dtype), value], dim=2)
        if attention_mask is not None:
            attention_mask = attention_mask.to(query.device)

        # Arbitrary masks need eager or sdpa; other kernels (flash) cannot express the block structure.
        implementation = self.config._attn_implementation
        implementation = implementation if implementation in ("eager", "sdpa") else "sdpa"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )  # (B, nb * S, heads, hd)
        output = output.reshape(rows, length, -1)
        return self.o_proj(output)


TWOTOWER_MIXER_TYPES = {**MIXER_TYPES, "linear_attention": TwoTowerMamba2Mixer, "full_attention": TwoTowerAttention}


class TwoTowerBlock(NemotronHBlock):
    """A Nemotron-H block built from TwoTower's mixers; the context tower runs Nemotron-H's own `forward`."""

    def __init__(self, config: TwoTowerConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.block_type = config.layers_block_type[layer_idx]
        self.mixer = TWOTOWER_MIXER_TYPES[self.block_type](config, layer_idx=layer_idx)


class TwoTowerDenoiserBlock(TwoTowerBlock):
    """A denoiser block: adaLN-single modulation, joint attention, seeded Mamba (ARCHITECTURE.md §4)."""

    def forward(
        self, hidden_states: torch.Tensor, modulation: torch.Tensor | None, context: DenoiserContext
    ) -> torch.Tensor:
        """hidden_states: (B * nb, S, H); modulation: (B * nb, 3, H) rows (shift, scale, gate), or None for no
        time conditioning at all."""
        normed_first = self.block_type in ("moe", "mlp")
        if modulation is None:
            normed = self.norm(hidden_states)
        else:
            modulation = modulation.to(hidden_states.device)
            shift, scale, gate = modulation[:, :, None, :].unbind(1)  # each (B * nb, 1, H)
            if normed_first:  # MoE / MLP: modulate(RMSNorm(x))
                normed = self.norm(hidden_states) * (1 + scale) + shift
            else:  # Mamba / attention: RMSNorm(modulate(x))
                normed = self.norm(hidden_states * (1 + scale) + shift)

        if self.block_type == "linear_attention":
            context_state = (context.conv_history[self.layer_idx], context.ssm_states[self.layer_idx])
            out = self.mixer(normed, context_state=context_state)
        elif self.block_type == "full_attention":
            context_kv = (context.keys[self.layer_idx], context.values[self.layer_idx])
            out, _ = self.mixer(
                normed, attention_mask=context.attention_mask, context_kv=context_kv, num_blocks=context.num_blocks
            )
        else:
            out = self.mixer(normed)

        if modulation is not None:
            out = gate * out
        return hidden_states + out


class TwoTowerTower(NemotronHModel):
    """One Nemotron-H backbone (`embeddings`, `layers`, `norm_f`) built from TwoTower blocks."""

    def __init__(self, config: TwoTowerConfig, block_class: type[TwoTowerBlock] = TwoTowerBlock):
        NemotronHPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([block_class(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()


class TwoTowerTimestepEmbedder(nn.Module):
    """`t` -> sinusoidal features (cos half, then sin half) of `t * scale` -> Linear, SiLU, Linear."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.frequency_size = config.time_embedding_size
        self.scale = config.time_embedding_scale
        self.mlp = nn.Sequential(
            nn.Linear(config.time_embedding_size, config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        # Like the release: the scaling happens in the model dtype, the sinusoid in fp32.
        u = (t.to(dtype) * self.scale).float()  # (B,)
        half = self.frequency_size // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = u[:, None] * frequencies[None]  # (B, half)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(dtype))


def two_tower_device_map(context_device, denoiser_device) -> dict[str, str | int | torch.device]:
    """A `device_map` placing the context tower (and its head) on `context_device` and the denoiser tower, its head
    and the time conditioning on `denoiser_device`, as the release ran them on two GPUs:
    `TwoTowerForDiffusionLM.from_pretrained(path, device_map=two_tower_device_map("cuda:0", "cuda:1"))`.
    The denoiser reads the context's K/V and Mamba states across devices."""
    return {
        "context_tower": context_device,
        "context_lm_head": context_device,
        "denoiser_tower": denoiser_device,
        "lm_head": denoiser_device,
        "t_embedder": denoiser_device,
        "t_block": denoiser_device,
        "scale_shift_tables": denoiser_device,
    }


class TwoTowerScaleShiftTables(nn.Module):
    """adaLN-single's per-layer tables: parameter `i` is layer `i`'s `(3, H)` table (rows: shift, scale, gate).

    A module with a `forward` (not a list read in place) so that Accelerate's hooks load and place the tables when
    they are offloaded. Its parameters are named `0`, `1`, ... as in the release (`scale_shift_tables.{i}`).
    """

    def __init__(self, num_layers: int, hidden_size: int):
        super().__init__()
        for i in range(num_layers):
            self.register_parameter(str(i), nn.Parameter(torch.zeros(3, hidden_size)))

    def __len__(self) -> int:
        return len(self._parameters)

    def __getitem__(self, index: int) -> nn.Parameter:
        return self._parameters[str(index)]

    def __iter__(self):
        return iter(self._parameters.values())

    def forward(self, t_emb: torch.Tensor) -> list[torch.Tensor]:
        """t_emb (rows, 3, H) -> every layer's `table + t_emb`, (rows, 3, H)."""
        return [table.to(t_emb.device) + t_emb for table in self]


class TwoTowerPreTrainedModel(NemotronHPreTrainedModel):
    config_class = TwoTowerConfig
    config: TwoTowerConfig
    base_model_prefix = "denoiser_tower"
    _no_split_modules = ["TwoTowerBlock", "TwoTowerDenoiserBlock"]
    _supports_flash_attn = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # transformers detects MoE support by looking for `@use_experts_implementation` in the class's module source; the
    # experts here are Nemotron-H's (which has it), so say so and get the same `grouped_mm` experts.
    _can_set_experts_implementation_cached_value = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TwoTowerForDiffusionLM):
            for table in module.scale_shift_tables:
                init.normal_(table, std=self.config.hidden_size**-0.5)


class TwoTowerForDiffusionLM(TwoTowerPreTrainedModel, TwoTowerGenerationMixin):
    """Nemotron-Labs-TwoTower.

    - `model(input_ids)` returns the context tower's next-token logits (like the release's `forward`).
    - `model(input_ids, labels=...)` returns the block-wise masked-diffusion loss (ARCHITECTURE.md §6).
    - `prefill`, `extend_context` and `denoise_step` are the inference building blocks generation is made of.
    - `generate(...)` runs mask diffusion, Mock-AR or AR (`TwoTowerGenerationMixin`).
    """

    generation_config_class = TwoTowerGenerationConfig
    # The loss averages over the masked tokens itself (not over labels): Trainer must not renormalise it with its
    # label count (`num_items_in_batch`), only average it over gradient-accumulation steps and processes.
    accepts_loss_kwargs = False

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config)
        self.context_tower = TwoTowerTower(config)
        self.context_lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.denoiser_tower = TwoTowerTower(config, block_class=TwoTowerDenoiserBlock)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.t_embedder = TwoTowerTimestepEmbedder(config)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 3 * config.hidden_size))
        self.scale_shift_tables = TwoTowerScaleShiftTables(config.num_hidden_layers, config.hidden_size)
        self.post_init()
        if config.freeze_context_tower:
            self.freeze_context_tower()

    # ----------------------------------------------------------------------------------------------------------------
    # Module plumbing

    def freeze_context_tower(self):
        for parameter in [*self.context_tower.parameters(), *self.context_lm_head.parameters()]:
            parameter.requires_grad_(False)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # Loading replaces every parameter with a fresh, trainable one: freeze the context tower again afterwards.
        loading_info = TwoTowerPreTrainedModel._finalize_model_loading(model, load_config, loading_info)
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
        return self.denoiser_tower.embeddings

    def set_input_embeddings(self, value):
        self.denoiser_tower.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ----------------------------------------------------------------------------------------------------------------
    # Context tower: writes the cache

    @torch.no_grad()
    def _run_context_tower(self, token_ids: torch.Tensor, cache: TwoTowerCache) -> torch.Tensor:
        """Append `token_ids` (B, L) to the cache (whose `attention_mask` already covers them); returns the context
        tower's last hidden state (B, L, H)."""
        mask = cache.attention_mask
        hidden = self.context_tower(
            input_ids=token_ids,
            attention_mask=None if bool(mask.all()) else mask,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        cache.record_written(token_ids.shape[1])
        return hidden

    def _zero_mamba_states(
        self, batch_size: int, device: torch.device
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The Mamba states of an empty context, on `device` (weights may be offloaded, so not theirs)."""
        mixer = next(layer.mixer for layer in self.context_tower.layers if layer.block_type == "linear_attention")
        shape = (batch_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
        conv = torch.zeros(
            batch_size, mixer.conv_dim, mixer.conv_kernel_size, dtype=mixer.in_proj.weight.dtype, device=device
        )
        ssm = torch.zeros(shape, dtype=torch.float32, device=device)
        return {
            i: (conv.clone(), ssm.clone())
            for i, kind in enumerate(self.config.layers_block_type)
            if kind == "linear_attention"
        }

    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, keep_previous: bool = True
    ) -> TwoTowerCache:
        """Run the context tower over left-padded prompts `(B, T)` and return their cache.

        With `keep_previous` (the default), the prompt is read as the release reads it, in two passes (all but the
        last token, then the last token), so that the cache also holds the Mamba states one token behind, which
        Mock-AR reads. Without, it is read in one pass.
        """
        mask = check_left_padded(input_ids, attention_mask)
        cache = TwoTowerCache(self.config)
        if not keep_previous:
            cache.attention_mask = mask
            hidden = self._run_context_tower(input_ids, cache)
        elif input_ids.shape[1] > 1:
            cache.attention_mask = mask[:, :-1]
            self._run_context_tower(input_ids[:, :-1], cache)
            cache.previous_mamba_states = cache.snapshot_mamba_states()
        else:
            cache.previous_mamba_states = self._zero_mamba_states(input_ids.shape[0], input_ids.device)
        if keep_previous:
            cache.attention_mask = mask
            hidden = self._run_context_tower(input_ids[:, -1:], cache)
        cache.next_token_logits = self.context_lm_head(hidden[:, -1]).float()
        return cache

    def extend_context(
        self, cache: TwoTowerCache, token_ids: torch.LongTensor, keep_previous: bool = True
    ) -> TwoTowerCache:
        """Append committed tokens `(B, L)` to the context (the prefix is never recomputed) and return the cache.

        For a single token the Mamba states before it are kept for Mock-AR (unless `keep_previous=False`); a
        multi-token block drops them.
        """
        if token_ids.dim() != 2 or token_ids.shape[0] != cache.attention_mask.shape[0] or token_ids.shape[1] == 0:
            raise ValueError(
                f"`token_ids` must have shape (batch={cache.attention_mask.shape[0]}, length >= 1), "
                f"got {tuple(token_ids.shape)}."
            )
        single = token_ids.shape[1] == 1
        cache.previous_mamba_states = cache.snapshot_mamba_states() if single and keep_previous else None
        cache.attention_mask = torch.cat([cache.attention_mask, torch.ones_like(token_ids)], dim=1)
        hidden = self._run_context_tower(token_ids, cache)
        cache.next_token_logits = self.context_lm_head(hidden[:, -1]).float()
        return cache

    # ----------------------------------------------------------------------------------------------------------------
    # Denoiser tower: reads the cache

    def time_embedding(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """`t` (rows,) -> `t_block(t_embedder(t))` viewed as (rows, 3, H); None stays None (no modulation)."""
        if t is None:
            return None
        return self.t_block(self.t_embedder(t)).view(t.shape[0], 3, self.config.hidden_size)

    def _denoise(self, block_ids: torch.LongTensor, context: DenoiserContext, t: torch.Tensor | None) -> torch.Tensor:
        """block_ids (B * nb, S) -> fp32 logits (B * nb, S, V)."""
        hidden = self.denoiser_tower.embeddings(block_ids)
        t_emb = self.time_embedding(t)
        # Per layer (B * nb, 3, H): shift, scale, gate; or None (no time conditioning).
        modulations = [None] * len(self.denoiser_tower.layers) if t_emb is None else self.scale_shift_tables(t_emb)
        for layer, modulation in zip(self.denoiser_tower.layers, modulations):
            hidden = layer(hidden, modulation, context=context)
        hidden = self.denoiser_tower.norm_f(hidden)
        return self.lm_head(hidden).float()

    def denoise_step(
        self, block_ids: torch.LongTensor, cache: TwoTowerCache, t: torch.Tensor | None, behind: bool = False
    ) -> torch.Tensor:
        """The denoiser's fp32 logits `(B, L, V)` for noisy blocks `(B, L)` after the cached context.

        `t` is `(B,)` (each row's masked fraction) or None for no time conditioning. `behind=True` reads the context
        one token behind (Mock-AR).
        """
        if block_ids.dim() != 2 or block_ids.shape[0] != cache.attention_mask.shape[0]:
            raise ValueError(
                f"`block_ids` must have shape (batch={cache.attention_mask.shape[0]}, length), "
                f"got {tuple(block_ids.shape)}."
            )
        if t is not None and t.shape != (block_ids.shape[0],):
            raise ValueError(f"`t` must have shape ({block_ids.shape[0]},) or be None, got {tuple(t.shape)}.")
        context = cache.denoiser_context(block_ids.shape[1], behind=behind)
        return self._denoise(block_ids, context, t)

    # ----------------------------------------------------------------------------------------------------------------
    # Training: block-wise masked diffusion

    @torch.no_grad()
    def _training_context(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> DenoiserContext:
        """Run the context tower once over the clean sequence `(B, nb * S)`, one block at a time, keeping what each
        block's denoiser pass needs: all K/V, and the Mamba states at the start of every block."""
        batch_size, length = input_ids.shape
        block_size = self.config.block_size
        num_blocks = length // block_size

        cache = TwoTowerCache(self.config)
        cache.attention_mask = attention_mask[:, :0]
        seeds = [self._zero_mamba_states(batch_size, input_ids.device)]
        for b in range(num_blocks):
            if b > 0:
                seeds.append(cache.snapshot_mamba_states())
            cache.attention_mask = attention_mask[:, : (b + 1) * block_size]
            self._run_context_tower(input_ids[:, b * block_size : (b + 1) * block_size], cache)

        # (B, nb, ...) -> (B * nb, ...): one row per block, matching the denoiser's layout.
        def per_block(index: int, layer: int) -> torch.Tensor:
            stacked = torch.stack([seed[layer][index] for seed in seeds], dim=1)
            return stacked.flatten(0, 1)

        conv_history = {i: per_block(0, i)[..., 1:] for i in cache.mamba_layers}
        ssm_states = {i: per_block(1, i) for i in cache.mamba_layers}
        keys = {i: cache.layers[i].keys for i in cache.attention_layers}
        values = {i: cache.layers[i].values for i in cache.attention_layers}

        # Block b's queries see clean context positions < b * S and their own (noisy) block.
        block_of = torch.arange(length, device=input_ids.device) // block_size
        sees_context = block_of[None, :] < block_of[:, None]  # (query, key)
        sees_block = block_of[None, :] == block_of[:, None]
        visible = torch.cat([sees_context, sees_block], dim=1)[None]  # (1, N, 2N)
        key_real = attention_mask.bool().repeat(1, 2)[:, None, :]  # (B, 1, 2N)
        dtype = next(iter(keys.values())).dtype if keys else self.dtype
        mask = additive_mask((visible & key_real)[:, None], dtype)  # (B, 1, N, 2N)
        return DenoiserContext(keys, values, conv_history, ssm_states, mask, num_blocks=num_blocks)

    def _draw_noise_mask(self, maskable: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per block, t ~ U(0, 1]; each maskable token is masked with probability t. maskable: (B, nb, S)."""
        batch_size, num_blocks, block_size = maskable.shape
        device = maskable.device
        t = 1.0 - torch.rand(batch_size, num_blocks, 1, generator=generator, device=device)
        draws = torch.rand(batch_size, num_blocks, block_size, generator=generator, device=device)
        return (draws < t) & maskable

    def diffusion_loss(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block-wise masked-diffusion loss (ARCHITECTURE.md §6). Returns `(loss, logits, noise_mask)`.

        Positions whose label is -100 are never masked (prompt or padding stays clean context). `noise_mask` (B, N)
        fixes which positions are masked instead of drawing them. Logits are `(B, N, V)` fp32 (sequence padded to
        whole blocks, then trimmed back).
        """
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
            )
        batch_size, length = input_ids.shape
        block_size = self.config.block_size
        num_blocks = -(-length // block_size)
        pad = num_blocks * block_size - length

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
        maskable = (labels != -100) & mask.bool()
        if noise_mask is None:
            noise_mask = self._draw_noise_mask(
                F.pad(maskable, (0, pad)).view(batch_size, num_blocks, block_size), generator
            )
            noise_mask = noise_mask.view(batch_size, -1)[:, :length]
        elif noise_mask.shape != input_ids.shape:
            raise ValueError(
                f"`noise_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(noise_mask.shape)}."
            )
        noise_mask = noise_mask.bool() & maskable

        # Whole blocks: pad the tail with invisible positions.
        clean = F.pad(input_ids, (0, pad), value=self.config.mask_token_id)
        mask = F.pad(mask, (0, pad), value=0)
        padded_noise = F.pad(noise_mask, (0, pad), value=False)
        noisy = clean.masked_fill(padded_noise, self.config.mask_token_id)
        t = padded_noise.view(batch_size * num_blocks, block_size).float().mean(-1)  # each block's masked fraction

        context = self._training_context(clean, mask)
        logits = self._denoise(noisy.view(batch_size * num_blocks, block_size), context, t)
        logits = logits.view(batch_size, num_blocks * block_size, -1)[:, :length]

        if noise_mask.any():
            loss = F.cross_entropy(logits[noise_mask], labels[noise_mask])
        else:  # nothing masked: a zero that still belongs to the graph
            loss = logits.sum() * 0.0
        return loss, logits, noise_mask

    # ----------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        noise_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Without `labels`: the context tower's next-token logits `(B, T, V)`, fp32 (no gradient).
        With `labels`: the masked-diffusion `loss` and the denoiser's logits (see `diffusion_loss`)."""
        if labels is not None:
            loss, logits, _ = self.diffusion_loss(input_ids, labels, attention_mask, noise_mask, generator)
            return CausalLMOutputWithPast(loss=loss, logits=logits)
        with torch.no_grad():
            hidden = self.context_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.context_lm_head(hidden).float()
        return CausalLMOutputWithPast(logits=logits)


__all__ = ["TwoTowerForDiffusionLM", "TwoTowerPreTrainedModel", "TwoTowerTower", "two_tower_device_map"]
