"""The context tower and the denoiser's view of a context (docs/architecture.md, "The context tower").

The context tower is the frozen autoregressive backbone with its head; its forward is Nemotron-H's. At inference it
writes a `TwoTowerDecodeState` (prefill, committed blocks, AR tokens; `decoding_twotower.context_step`), in training it reads a whole
clean sequence in one pass (`training_context`). Either way the denoiser gets a `DenoiserContext`: at inference one
noisy block per row after the state's context (`decoding_twotower.denoiser_context`), in training every block of the
sequence, block `b` after the clean context `< b * S` (`denoiser_view`).

"Behind" names one concept: the context as it was one token earlier (K/V without the last position, the Mamba
states before the last token). Mock-AR reads it; `keep_behind` decides whether the state keeps those Mamba states.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers.cache_utils import DynamicCache
from transformers.models.nemotron_h.modeling_nemotron_h import (
    MIXER_TYPES,
    NemotronHModel,
    NemotronHRMSNorm,
    apply_mask_to_padding_states,
)

from .backbone_twotower import (
    RECORD_NOTHING,
    TwoTowerBlock,
    TwoTowerMamba2Mixer,
    TwoTowerPreTrainedModel,
    block_start_states,
)
from .configuration_twotower import TwoTowerConfig


@dataclass
class DenoiserContext:
    """The denoiser's view of a context, per layer index. It reads the context; at inference each step writes its
    block's K/V at `block_positions` of the decode state's buffers (never into the context positions).

    - `keys`, `values`: attention layers' context K/V, `(B, kv_heads, T, head_dim)`; at inference the decode state's
      whole buffers, `T` = its width;
    - `conv_history`: Mamba layers' last `conv_kernel - 1` raw `xBC` columns before each block,
      `(B * nb, conv_dim, K - 1)`;
    - `ssm_states`: the SSM state each block's scan starts from, `(B * nb, heads, head_dim, state)`;
    - `attention_mask`: additive, over `[context keys | block keys]`, or None when every key is visible;
    - `num_blocks`: noisy blocks per row (1 at inference, every block of the sequence in training);
    - `blockwise`: training's block structure without a dense mask (block `b` sees context keys `< b * S` and its own
      block), with `key_real`, `(B, T + nb * S)` bool over `[context keys | block keys]`, or None when every key is
      real; `flex_mask`: the same as a `BlockMask`, where `flex_attention` runs (set by the denoiser's forward);
    - `block_positions` (inference): where in `keys` / `values` the block's own K/V are written, `(L,)`.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    conv_history: dict[int, torch.Tensor]
    ssm_states: dict[int, torch.Tensor]
    attention_mask: torch.Tensor | None
    num_blocks: int = 1
    blockwise: bool = False
    key_real: torch.Tensor | None = None
    flex_mask: BlockMask | None = None
    block_positions: torch.Tensor | None = None


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `visible` -> 0 where visible, the dtype's most negative value elsewhere (finite: no NaN rows)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def check_prompt_ids(input_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a non-empty (batch, length) tensor, got {shape}.")


def check_token_ids(token_ids: torch.Tensor, vocab_size: int, name: str = "input_ids"):
    """Refuse ids that are not integers or lie outside `[0, vocab_size)`, before any embedding reads them."""
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {token_ids.dtype}.")
    if token_ids.numel():
        low, high = torch.stack(torch.aminmax(token_ids)).tolist()  # one read on the host
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"`{name}` holds the id {bad}, outside the vocabulary's range [0, {vocab_size}).")


def check_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a prompt batch for the context tower and return its mask as 0/1 longs.

    Only left padding is accepted: transformers' Nemotron-H lets the SSM state decay over right padding.
    """
    check_prompt_ids(input_ids)
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}."
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if (mask[:, 1:] < mask[:, :-1]).any() or not bool(mask[:, -1].all()):
        raise ValueError(
            "`attention_mask` must describe LEFT padding (zeros, then ones, ending on a real token in every row); "
            "pad prompts on the left (`tokenizer.padding_side = 'left'`)."
        )
    return mask


def denoiser_view(
    keys: dict[int, torch.Tensor],
    values: dict[int, torch.Tensor],
    conv_history: dict[int, torch.Tensor],
    ssm_states: dict[int, torch.Tensor],
    context_mask: torch.Tensor,
    context_ends: list[int],
    block_length: int,
    block_mask: torch.Tensor | None = None,
) -> DenoiserContext:
    """The denoiser's view of a training context for `nb = len(context_ends)` noisy blocks per row (inference builds
    its own from the decode state: `decoding_twotower.denoiser_context`).

    keys/values: `{layer: (B, kv_heads, T, hd)}`; conv_history / ssm_states: `{layer: (B * nb, ...)}`, the Mamba
    states each block's scans start from; context_mask `(B, T)`: 1 for real context tokens; context_ends: per block,
    how many context positions it sees (block `b` sees keys `< context_ends[b]`); block_mask `(B, nb * L)`: 1 for real
    block positions (None: all real). Block queries also see every real position of their own block, and nothing of
    the other blocks. Several blocks get the blockwise form (no dense mask); one block, a mask over its keys.
    """
    num_blocks = len(context_ends)
    context_real = context_mask.bool()
    block_real = context_real.new_ones(context_real.shape[0], num_blocks * block_length)
    if block_mask is not None:
        block_real = block_mask.bool()
    key_real = torch.cat([context_real, block_real], dim=1)  # (B, T + Q)
    if num_blocks > 1:
        real = None if key_real.all() else key_real
        return DenoiserContext(keys, values, conv_history, ssm_states, None, num_blocks, True, real)

    mask = None
    dtype = next(iter(keys.values())).dtype if keys else torch.float32
    device, length = context_real.device, context_real.shape[1]
    if not key_real.all() or context_ends[0] < length:  # (training's one block sees no context: < 0 * S)
        sees_context = torch.arange(length, device=device)[None, :] < context_ends[0]  # (1, T)
        sees_block = torch.ones(block_length, block_length, dtype=torch.bool, device=device)
        visible = torch.cat([sees_context.expand(block_length, -1), sees_block], dim=1)[None]  # (1, L, T + L)
        mask = additive_mask((visible & key_real[:, None, :])[:, None], dtype)  # (B, 1, L, T + L)
    return DenoiserContext(keys, values, conv_history, ssm_states, mask, num_blocks)


def execution_device(module: nn.Module, default) -> torch.device:
    """Where `module` computes: its Accelerate hook's device when it has one (offloaded weights are on `meta`), else
    its weights' device, else `default`."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    weight = next(module.parameters(), None)
    return torch.device(default) if weight is None or weight.device.type == "meta" else weight.device


def decode_placement(model, device) -> tuple:
    """Where and in which dtype each context layer's decode buffers live: `(layer, device, dtype)` per layer."""
    placement = []
    for layer in model.context_tower.layers:
        if layer.block_type in ("full_attention", "linear_attention"):
            weight = layer.mixer.k_proj.weight if layer.block_type == "full_attention" else layer.mixer.in_proj.weight
            placement.append((layer.layer_idx, execution_device(layer, device), weight.dtype))
    return tuple(placement)


class TwoTowerDecodeState:
    """The fixed-address state both towers decode from (docs/architecture.md, "Decoding").

    keys, values: `{layer: (B, kv_heads, max_length + block_size, hd)}`; positions `< max_length` are the context, the
        last `block_size` the denoiser's block region; each on its layer's device, in its layer's dtype;
    conv, ssm: `{layer: (B, conv_dim, K)}` raw xBC inputs and `{layer: (B, heads, hd, N)}` fp32 SSM states;
    conv_behind, ssm_behind: the same one token behind (Mock-AR), or empty;
    key_real: `(B, max_length + block_size)` bool, True at real context positions (never in the block region);
    length: 0-d long tensor, the context positions written so far (prompts are left-padded: all rows share it);
    num_written: the same on the host (bounds are checked there, without reading `length`);
    behind_ready: whether `conv_behind` / `ssm_behind` are one token behind the context (the last write was one
        token that kept them);
    next_token_logits: `(B, V)` fp32, the context tower's prediction after the last context token.
    """

    def __init__(self, model, batch_size: int, max_length: int, block_size: int, keep_behind: bool, device):
        self.batch_size, self.max_length, self.block_size = batch_size, max_length, block_size
        self.keep_behind, self.placement = keep_behind, decode_placement(model, device)
        self.keys, self.values, self.conv, self.ssm, self.conv_behind, self.ssm_behind = {}, {}, {}, {}, {}, {}
        width = max_length + block_size
        for layer in model.context_tower.layers:
            i, mixer = layer.layer_idx, layer.mixer
            where = execution_device(layer, device)
            if layer.block_type == "full_attention":
                weight = mixer.k_proj.weight
                shape = (batch_size, weight.shape[0] // mixer.head_dim, width, mixer.head_dim)
                self.keys[i] = torch.zeros(shape, dtype=weight.dtype, device=where)
                self.values[i] = torch.zeros(shape, dtype=weight.dtype, device=where)
            elif layer.block_type == "linear_attention":
                dtype = mixer.in_proj.weight.dtype
                self.conv[i] = torch.zeros(
                    batch_size, mixer.conv_dim, mixer.conv_kernel_size, dtype=dtype, device=where
                )
                self.ssm[i] = torch.zeros(
                    batch_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=where
                )
                if keep_behind:
                    self.conv_behind[i], self.ssm_behind[i] = (
                        torch.zeros_like(self.conv[i]),
                        torch.zeros_like(self.ssm[i]),
                    )
        self.key_real = torch.zeros(batch_size, width, dtype=torch.bool, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.num_written, self.behind_ready = 0, False
        self.next_token_logits: torch.Tensor | None = None
        for tensor in self.tensors():
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs read and write them in place

    @property
    def shape_key(self) -> tuple:
        """What a compiled step is specialised to; states with the same key are interchangeable (`StatePool`)."""
        return (self.batch_size, self.max_length, self.block_size, self.keep_behind, self.device, self.placement)

    @property
    def device(self) -> torch.device:
        return self.key_real.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.keys.values())).dtype if self.keys else torch.float32

    def tensors(self) -> list[torch.Tensor]:
        groups = [self.keys, self.values, self.conv, self.ssm, self.conv_behind, self.ssm_behind]
        return [t for group in groups for t in group.values()] + [self.key_real, self.length]

    def reset(self) -> "TwoTowerDecodeState":
        """Empty: no context written (the buffers keep their addresses)."""
        for tensor in self.tensors():
            tensor.zero_()
        self.num_written, self.behind_ready, self.next_token_logits = 0, False, None
        return self

    @staticmethod
    def length_for(prompt_length: int, new_tokens: int, block_size: int) -> int:
        """The context positions a generation needs: the prompt and the new tokens, rounded up to whole blocks (every
        block is generated whole, then trimmed)."""
        return -(-(prompt_length + new_tokens) // block_size) * block_size

    def written(self, length: int, next_token_logits: torch.Tensor, kept_behind: bool):
        """Record on the host that `length` tokens were appended (the step already advanced `length`)."""
        self.num_written += length
        self.next_token_logits = next_token_logits
        self.behind_ready = kept_behind

    def check_room(self, length: int, what: str):
        """Refuse, before anything runs, `length` more context tokens that would not fit."""
        if self.num_written + length > self.max_length:
            raise ValueError(
                f"{what} of {length} tokens does not fit the decode state: {self.num_written} of its "
                f"{self.max_length} context positions are written. Prefill with a larger `max_length`."
            )

    def copy_rows_from(self, other: "TwoTowerDecodeState", rows: torch.LongTensor) -> "TwoTowerDecodeState":
        """Fill this state with `other`'s `rows` (in that order; as many as this state's batch)."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            if mine is self.length:  # shared by every row
                mine.copy_(theirs)
            else:
                mine.copy_(theirs.index_select(0, rows.to(theirs.device)))
        self.num_written, self.behind_ready = other.num_written, other.behind_ready
        logits = other.next_token_logits
        self.next_token_logits = None if logits is None else logits.index_select(0, rows.to(logits.device))
        return self

    # The context tower's attention layers write through transformers' cache interface (`NemotronHAttention`).
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write a step's K/V `(B, kv_heads, L, hd)` at context positions `length .. length + L - 1` and return the
        layer's whole buffers (`visible_keys` masks what is not context yet, and the block region)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        positions = self.length.to(keys.device) + torch.arange(key_states.shape[2], device=keys.device)
        keys.index_copy_(2, positions, key_states.to(keys.dtype))
        values.index_copy_(2, positions, value_states.to(values.dtype))
        return keys, values

    def write_mamba_state(self, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv[layer_idx].copy_(conv)
        self.ssm[layer_idx].copy_(ssm)

    def keep_states_behind(self):
        """Copy the Mamba states to the ones behind, before a step writes the next (one launch on CUDA)."""
        if self.conv_behind:
            torch._foreach_copy_(
                [*self.conv_behind.values(), *self.ssm_behind.values()],
                [*(self.conv[i] for i in self.conv_behind), *(self.ssm[i] for i in self.ssm_behind)],
            )


class TwoTowerCache(DynamicCache):
    """The context tower's cache for one training pass (`TwoTowerContextTower.training_context`): transformers'
    hybrid `DynamicCache` (K/V per attention layer), plus the Mamba states at every block start, which each block's
    denoiser scan starts from. Inference decodes from `decoding_twotower.TwoTowerDecodeState` instead."""

    def __init__(self, config: TwoTowerConfig, block_size: int):
        super().__init__(config=config)
        self.attention_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "full_attention"]
        self.block_size = block_size
        self.block_starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per Mamba layer, set by its mixer


class ContextMamba2Mixer(TwoTowerMamba2Mixer):
    """The context tower's Mamba-2 mixer: every case is the seeded scan (`seeded_scan`), so the `dt` clamp and the
    scan are written once for both towers:

    - no cache (`model(input_ids)`, log-likelihoods): from the empty state;
    - a decode state (`decoding_twotower`: prefill, extensions, AR steps): from the state's, written back in place;
    - a training cache: from the empty state over the whole clean sequence, also recording the state at every block
      start.
    """

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        # Padding is zeroed before the projection, as in Nemotron-H (the scan zeroes it again after the conv).
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        if cache_params is not None and not isinstance(cache_params, TwoTowerDecodeState | TwoTowerCache):
            raise TypeError(
                f"TwoTower's context tower writes a `TwoTowerDecodeState` (`model.prefill`), not a "
                f"{type(cache_params).__name__}; call it with `use_cache=False` for a forward without a cache."
            )
        if isinstance(cache_params, TwoTowerDecodeState):
            i = self.layer_idx
            out, conv, ssm = self.seeded_scan(
                hidden_states, cache_params.conv[i][..., 1:], cache_params.ssm[i], attention_mask
            )
            cache_params.write_mamba_state(i, conv, ssm)
            return out
        conv_history, ssm_state = self.empty_state(hidden_states)
        if cache_params is None:
            return self.seeded_scan(hidden_states, conv_history, ssm_state, attention_mask)[0]
        gate, conv_inputs, x, dt, B, C = self.scan_inputs(hidden_states, conv_history, attention_mask)
        y, _ = self.scan_from(x, dt, B, C, ssm_state)
        cache_params.block_starts[self.layer_idx] = block_start_states(
            conv_inputs, x, dt, self.ssm_decay_rates, B, ssm_state, cache_params.block_size, self.conv_kernel_size
        )
        return self.gated_output(y, gate, hidden_states.dtype)

    def empty_state(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv history `(B, conv_dim, K - 1)` and SSM state `(B, heads, hd, N)` (fp32) of an empty context."""
        batch_size = hidden_states.shape[0]
        conv_history = hidden_states.new_zeros(batch_size, self.conv_dim, self.conv_kernel_size - 1)
        ssm_state = torch.zeros(
            batch_size, self.num_heads, self.head_dim, self.ssm_state_size, device=hidden_states.device
        )
        return conv_history, ssm_state


class TwoTowerContextBlock(TwoTowerBlock):
    mixer_types = {**MIXER_TYPES, "linear_attention": ContextMamba2Mixer}


class TwoTowerContextTower(TwoTowerPreTrainedModel, NemotronHModel):
    """The frozen autoregressive tower: Nemotron-H (`embeddings`, `layers`, `norm_f`) and its head `lm_head`.

    `forward` is Nemotron-H's (hidden states), also at inference, over a decode state; `training_context` reads a
    training sequence into the denoiser's view.
    It always runs without gradient, so it is never gradient-checkpointed.
    """

    _tied_weights_keys = {"lm_head.weight": "embeddings.weight"}  # only with `tie_word_embeddings`

    def __init__(self, config: TwoTowerConfig):
        TwoTowerPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [TwoTowerContextBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def next_token_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    @torch.compiler.disable  # bookkeeping around one pass; the pass itself is Nemotron-H's forward
    @torch.no_grad()
    def training_context(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, block_size: int
    ) -> DenoiserContext:
        """Read a clean sequence `(B, nb * S)` in one causal pass, keeping what every block's denoiser pass needs: all
        K/V, and the Mamba states at the start of every block (recorded by the Mamba mixers during the pass). Block
        `b` sees context positions `< b * S` (blockwise attention: no dense mask; the tests hold the dense
        reference)."""
        num_blocks = input_ids.shape[1] // block_size
        cache = TwoTowerCache(self.config, block_size)
        self(
            input_ids=input_ids,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            past_key_values=cache,
            use_cache=True,
            **RECORD_NOTHING,
        )
        keys = {i: cache.layers[i].keys for i in cache.attention_layers}
        values = {i: cache.layers[i].values for i in cache.attention_layers}
        conv_history = {i: conv.flatten(0, 1) for i, (conv, _) in cache.block_starts.items()}  # (B * nb, ...)
        ssm_states = {i: ssm.flatten(0, 1) for i, (_, ssm) in cache.block_starts.items()}
        ends = [b * block_size for b in range(num_blocks)]
        return denoiser_view(keys, values, conv_history, ssm_states, attention_mask, ends, block_size, attention_mask)


__all__ = [
    "DenoiserContext",
    "TwoTowerCache",
    "TwoTowerContextTower",
    "TwoTowerDecodeState",
    "check_left_padded",
    "check_prompt_ids",
    "denoiser_view",
]
