"""The denoiser tower: the backbone with the four changes of docs/architecture.md ("The denoiser tower").

1. adaLN-single time conditioning: `TwoTowerAdaLNSingle` turns `t` into every layer's `(shift, scale, gate)`;
2. where the modulation sits: `TwoTowerDenoiserBlock.forward` (before the norm for Mamba and attention, after it for
   MoE and MLP; the gate scales the mixer's output);
3. layer-aligned joint attention over the context's K/V and the block: `DenoiserAttention`;
4. context-seeded Mamba: `DenoiserMamba2Mixer`, the shared seeded scan started from the context's state.

`TwoTowerDenoiser` holds the embeddings, the blocks, adaLN-single and the final norm; its `forward(input_ids,
context, t)` gives the hidden states of noisy blocks after a `DenoiserContext`. The head (`lm_head`) is the model's.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.nemotron_h.modeling_nemotron_h import (
    MIXER_TYPES,
    NemotronHAttention,
    NemotronHRMSNorm,
    NemotronHTopkRouter,
    eager_attention_forward,
)
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .backbone_twotower import TwoTowerBlock, TwoTowerMamba2Mixer, TwoTowerPreTrainedModel, compiled_once_per_kind
from .configuration_twotower import TwoTowerConfig
from .context_twotower import DenoiserContext, additive_mask


# ---------------------------------------------------------------------------------------------------------------------
# 1. adaLN-single


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


class TwoTowerScaleShiftTables(nn.Module):
    """Per-layer tables: parameter `i` is layer `i`'s `(3, H)` table (rows: shift, scale, gate), named `0`, `1`, ...
    as in the release. A module with a `forward` so that Accelerate's hooks place the tables when offloaded."""

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


class TwoTowerAdaLNSingle(nn.Module):
    """adaLN-single: one time embedding for the whole tower, `t_emb = t_block(t_embedder(t))` of size 3H, plus a
    learnt table per layer. Layer `i` is modulated by `(shift, scale, gate) = scale_shift_tables[i] + t_emb`."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.t_embedder = TwoTowerTimestepEmbedder(config)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 3 * config.hidden_size))
        self.scale_shift_tables = TwoTowerScaleShiftTables(config.num_hidden_layers, config.hidden_size)

    def forward(self, t: torch.Tensor) -> list[torch.Tensor]:
        """`t` (rows,) -> per layer, (rows, 3, H): rows of shift, scale, gate."""
        t_emb = self.t_block(self.t_embedder(t)).view(t.shape[0], 3, self.hidden_size)
        return self.scale_shift_tables(t_emb)


# ---------------------------------------------------------------------------------------------------------------------
# 3. and 4.: the mixers that read the context


class DenoiserAttention(NemotronHAttention):
    """Joint attention: queries from the block(s); keys/values = [this layer's context K/V | the blocks' own K/V]."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        context_keys: torch.Tensor,
        context_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_blocks: int = 1,
        blockwise: bool = False,
        key_real: torch.Tensor | None = None,
        block_positions: torch.Tensor | None = None,
        flex_mask: BlockMask | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B * nb, S, H), context K/V: (B, kv_heads, T, hd). No causal mask.

        Dense (inference, and the reference): `attention_mask` additive, broadcastable to (B, heads, nb * S, T + nb * S),
        or None for "every key visible". Blockwise (training, `T = nb * S`): block `b` attends to the context keys
        `< b * S` and its own block, without a (nb * S, T + nb * S) mask: one `flex_attention` call with `flex_mask`
        where flex runs (`flex_attention_runs`), else chunks of blocks (`_chunked`); `key_real` (B, T + nb * S) bool,
        or None when every key is real. Inference (`block_positions` given): the context K/V are the decode state's
        buffers (B, kv_heads, width, hd); the block's K/V are written at `block_positions` (L,) of them and
        `attention_mask` covers `width`.
        """
        rows, length, _ = hidden_states.shape
        hidden_states = hidden_states.reshape(rows // num_blocks, num_blocks * length, -1)  # (B, nb * S, H)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)

        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, heads, nb * S, hd)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, kv_heads, nb * S, hd)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if block_positions is not None:
            # Inference: the block's K/V go to `block_positions` of the decode state's buffers, in place: into the
            # state itself (no copy of the context), or into the copy `.to` makes for another device or dtype (a
            # device map, towers in two dtypes). With gradients, buffers the state owns are not written: a copy is.
            owned = (context_keys.device, context_keys.dtype) == (key.device, key.dtype)
            write = torch.Tensor.index_copy if owned and torch.is_grad_enabled() else torch.Tensor.index_copy_
            positions = block_positions.to(key.device)
            context_keys = write(context_keys.to(key.device, key.dtype), 2, positions, key)
            context_values = write(context_values.to(value.device, value.dtype), 2, positions, value)
        # The context K/V (written by the context tower, perhaps on another device) move to this layer.
        context_keys = context_keys.to(key.device, key.dtype)
        context_values = context_values.to(value.device, value.dtype)
        dropout = self.attention_dropout if self.training else 0.0
        if blockwise:
            if flex_mask is not None:
                output = self._flex(query, key, value, context_keys, context_values, flex_mask)
            else:
                output = self._chunked(query, key, value, context_keys, context_values, key_real, num_blocks, dropout)
            return self.o_proj(output.reshape(rows, length, -1))

        if block_positions is not None:
            key, value = context_keys, context_values
        else:  # training
            key = torch.cat([context_keys, key], dim=2)  # (B, kv_heads, T + nb * S, hd)
            value = torch.cat([context_values, value], dim=2)
        if attention_mask is not None:
            attention_mask = attention_mask.to(query.device, query.dtype)
        # Arbitrary masks need eager or sdpa; other kernels (flash) cannot express the block structure.
        implementation = self.config._attn_implementation
        implementation = implementation if implementation in ("eager", "sdpa") else "sdpa"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False
        )  # (B, nb * S, heads, hd)
        return self.o_proj(output.reshape(rows, length, -1))

    def _flex(self, query, key, value, context_keys, context_values, flex_mask: BlockMask) -> torch.Tensor:
        """Every block at once: one `flex_attention` call over [context keys | block keys] that skips what
        `flex_mask` hides, compiled (by the caller's `torch.compile`, or here). Returns (B, nb * S, heads, hd)."""
        check_training_context(context_keys, query.shape[2])
        keys, values = torch.cat([context_keys, key], dim=2), torch.cat([context_values, value], dim=2)
        attend = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        output = attend(
            query, keys, values, block_mask=flex_mask.to(query.device), scale=self.scaling, enable_gqa=True
        )
        return output.transpose(1, 2)

    def _chunked(self, query, key, value, context_keys, context_values, key_real, num_blocks, dropout):
        """Blocks in chunks of `CHUNK_BLOCKS`, one attention call each: a chunk's queries over the context keys before
        its end and its own blocks' keys, masked by `sees_in_training`. Work grows as causal attention's, memory
        linearly: each chunk is recomputed in the backward pass instead of keeping its keys and weights. Returns
        (B, nb * S, heads, hd)."""
        length = query.shape[2]
        block = length // num_blocks
        check_training_context(context_keys, length)
        if key_real is not None:
            key_real = key_real.to(query.device)  # the context tower's device, under a device map
        outputs = []
        for start in range(0, length, CHUNK_BLOCKS * block):
            chunk = slice(start, min(start + CHUNK_BLOCKS * block, length))
            inputs = (query[:, :, chunk], key[:, :, chunk], value[:, :, chunk], context_keys[:, :, : chunk.stop],
                      context_values[:, :, : chunk.stop], key_real, chunk.start, length, block, dropout)  # fmt: skip
            if torch.is_grad_enabled():
                # Recomputed in the backward pass (the mask too): otherwise every chunk would keep its own copy of the
                # context keys, its mask and its attention weights for backward, memory quadratic in the sequence.
                outputs.append(checkpoint(self._attend_chunk, *inputs, use_reentrant=False))
            else:
                outputs.append(self._attend_chunk(*inputs))
        return torch.cat(outputs, dim=2).transpose(1, 2)

    def _attend_chunk(self, query, key, value, context_keys, context_values, key_real, start, length, block, dropout):
        """One chunk's queries (B, heads, L, hd), at positions `start ..`, over [the context keys before the chunk's
        end | the chunk's own keys]: `sees_in_training` on their positions in [context | blocks] (`length` each),
        real keys only (`key_real` (B, 2 * length) bool, or None). Returns (B, heads, L, hd)."""
        device = query.device
        queries = torch.arange(start, start + query.shape[2], device=device)
        keys_at = torch.cat([torch.arange(context_keys.shape[2], device=device), length + queries])
        visible = sees_in_training(queries[:, None], keys_at[None, :], length, block)[None, None]  # (1, 1, L, keys)
        if key_real is not None:
            visible = visible & key_real[:, keys_at][:, None, None, :]
        mask = additive_mask(visible, query.dtype)  # built whatever it holds: reading it would sync with the host
        keys = torch.cat([context_keys, key], dim=2)
        values = torch.cat([context_values, value], dim=2)
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, dropout_p=dropout, scale=self.scaling, enable_gqa=True
        )


def check_training_context(context_keys: torch.Tensor, length: int):
    if context_keys.shape[2] != length:
        raise ValueError(f"training attention reads a context of nb * S = {length} keys, got {context_keys.shape[2]}")


def sees_in_training(query: torch.Tensor, key: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """Training attention's rule (docs/architecture.md, "Training") on positions in [context keys | block keys],
    `length` each: a query of block `b` sees the context keys `< b * S` and the keys of its own block. Broadcasts;
    the chunked form and flex's `BlockMask` both read it."""
    query_block = query // block
    return torch.where(key < length, key < query_block * block, (key - length) // block == query_block)


# Blocks per attention call in training's chunked form (`DenoiserAttention._chunked`): 128 queries a call. Fewer,
# larger calls than one per block, and each mask stays small beside its keys (docs/training.md, "Where the time goes").
CHUNK_BLOCKS = 8


def flex_attention_runs(device: torch.device, dropout: float) -> bool:
    """Whether training attention takes `flex_attention`: on CUDA, without dropout (flex has none). On the CPU,
    torch 2.13's flex_attention has no backward pass."""
    return device.type == "cuda" and dropout == 0.0


@functools.cache
def compiled_flex_attention():
    """`flex_attention` compiled once per process, with automatic dynamic shapes (eager it runs a dense reference
    implementation, and static shapes would fall back to it past dynamo's recompile limit)."""
    return torch.compile(flex_attention)


def training_flex_mask(key_real: torch.Tensor | None, num_blocks: int, block: int, device) -> BlockMask:
    """Training attention's mask as a `BlockMask` over [context keys | block keys], (nb * S, 2 * nb * S): a query of
    block `b` sees the context keys `< b * S` and its own block's keys, real ones only (`key_real` (B, 2 * nb * S)
    bool, or None when all are real)."""
    length = num_blocks * block

    def visible(batch, head, query, key):
        sees = sees_in_training(query, key, length, block)
        return sees if key_real is None else sees & key_real[batch, key]

    if key_real is not None:
        key_real = key_real.to(device)
    rows = None if key_real is None else key_real.shape[0]
    # Compiled on CUDA, the mask is evaluated tile by tile; eager (the CPU tests) it is built whole, (B, N, 2N).
    compiled = torch.device(device).type == "cuda"
    return create_block_mask(visible, rows, None, length, 2 * length, device=device, _compile=compiled)


class DenoiserMamba2Mixer(TwoTowerMamba2Mixer):
    """Mamba-2 over a block, its conv and scan started from the context's state; nothing is written back."""

    def forward(self, hidden_states: torch.Tensor, conv_history: torch.Tensor, ssm_state: torch.Tensor):
        # Through the module call (not `seeded_scan` directly), so that Accelerate's hooks fire.
        return self.seeded_scan(hidden_states, conv_history, ssm_state)[0]


# ---------------------------------------------------------------------------------------------------------------------
# 2. The block, and the tower


class TwoTowerDenoiserBlock(TwoTowerBlock):
    """A denoiser block: adaLN-single modulation around Nemotron-H's pre-norm residual, mixers that read the context."""

    mixer_types = {**MIXER_TYPES, "linear_attention": DenoiserMamba2Mixer, "full_attention": DenoiserAttention}

    @compiled_once_per_kind
    def forward(
        self, hidden_states: torch.Tensor, modulation: torch.Tensor | None, context: DenoiserContext
    ) -> torch.Tensor:
        """hidden_states: (B * nb, S, H); modulation: (B * nb, 3, H) rows (shift, scale, gate), or None for no
        time conditioning at all."""
        if modulation is None:
            normed = self.norm(hidden_states)
        else:
            shift, scale, gate = modulation.to(hidden_states.device)[:, :, None, :].unbind(1)  # each (B * nb, 1, H)
            if self.block_type in ("moe", "mlp"):  # modulate(RMSNorm(x))
                normed = self.norm(hidden_states) * (1 + scale) + shift
            else:  # Mamba / attention: RMSNorm(modulate(x))
                normed = self.norm(hidden_states * (1 + scale) + shift)

        i = self.layer_idx
        if self.block_type == "linear_attention":
            out = self.mixer(normed, context.conv_history[i], context.ssm_states[i])
        elif self.block_type == "full_attention":
            out = self.mixer(
                normed, context.keys[i], context.values[i], context.attention_mask, context.num_blocks,
                context.blockwise, context.key_real, context.block_positions, context.flex_mask,
            )  # fmt: skip
        else:
            out = self.mixer(normed)

        if modulation is not None:
            out = gate * out
        return hidden_states + out


class TwoTowerDenoiser(TwoTowerPreTrainedModel):
    """The denoiser tower: `embeddings`, `layers`, `norm_f` as in Nemotron-H, plus `adaln` (adaLN-single).

    `forward(input_ids, context, t)` runs noisy blocks `(B * nb, S)` after a `DenoiserContext` (from
    `decoding_twotower.denoiser_context` or `TwoTowerContextTower.training_context`) and returns their final hidden
    states. `t` `(B * nb,)` is each block's masked fraction, or None for no time conditioning (Mock-AR).
    `output_router_logits` records every router's logits `(B * nb * S, n_routed_experts)` as Nemotron-H records them
    (transformers' output hooks; the config's flag when not given); the forward collects hidden states itself.
    """

    _can_record_outputs = {"router_logits": OutputRecorder(NemotronHTopkRouter, index=0)}

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [TwoTowerDenoiserBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.adaln = TwoTowerAdaLNSingle(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TwoTowerScaleShiftTables):
            for table in module:
                init.normal_(table, std=self.config.hidden_size**-0.5)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor,
        context: DenoiserContext,
        t: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool | None = None,
        output_attentions: bool = False,
    ) -> MoeModelOutputWithPast:
        """`output_router_logits` is read by `capture_outputs` (the routers' logits, default: the config's flag)."""
        if output_attentions:
            raise ValueError("The denoiser does not record attentions.")
        dropout = self.config.attention_dropout if self.training else 0.0
        if context.blockwise and flex_attention_runs(input_ids.device, dropout):  # one mask for every attention layer
            flex_mask = training_flex_mask(context.key_real, context.num_blocks, input_ids.shape[1], input_ids.device)
            context = dataclasses.replace(context, flex_mask=flex_mask)
        hidden = self.embeddings(input_ids)  # (B * nb, S, H)
        modulations = [None] * len(self.layers) if t is None else self.adaln(t)
        all_hidden = [hidden] if output_hidden_states else None
        for layer, modulation in zip(self.layers, modulations):
            hidden = layer(hidden, modulation, context=context)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm_f(hidden)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None
        )


__all__ = ["TwoTowerAdaLNSingle", "TwoTowerDenoiser", "TwoTowerTimestepEmbedder"]
