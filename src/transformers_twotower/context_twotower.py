"""The context tower and the context it writes (docs/architecture.md, "The context tower" and "Caches").

The context tower is the frozen autoregressive backbone with its head. It computes everything a `TwoTowerCache`
holds (generation only drops finished rows from it, with `keep_rows`):

- `prefill` reads left-padded prompts, `extend` appends committed tokens (the prefix is never recomputed);
- `training_context` reads a whole clean training sequence, block after block;
- both hand the denoiser a `DenoiserContext` (it never writes the context's positions), built by one function,
  `denoiser_view`: at inference one noisy block per row after the whole cache, in training every block of the
  sequence, block `b` after the clean context `< b * S`.

"Behind" names one concept: the context as it was one token earlier (K/V without the last position, the Mamba
states before the last token). Mock-AR reads it; `keep_behind` decides whether the cache keeps those states.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.nemotron_h.modeling_nemotron_h import (
    MIXER_TYPES,
    NemotronHModel,
    NemotronHRMSNorm,
    apply_mask_to_padding_states,
)

from .backbone_twotower import TwoTowerBlock, TwoTowerMamba2Mixer, TwoTowerPreTrainedModel, block_start_states
from .configuration_twotower import TwoTowerConfig


MambaStates = dict[int, tuple[torch.Tensor, torch.Tensor]]  # {layer: (conv_state (B, conv_dim, K), ssm_state)}


@dataclass
class DenoiserContext:
    """The denoiser's view of a context, per layer index. It reads the context; at inference each step writes its
    block's K/V into the tail of `joint_keys` / `joint_values` (never into the context positions).

    - `keys`, `values`: attention layers' context K/V, `(B, kv_heads, T, head_dim)`;
    - `conv_history`: Mamba layers' last `conv_kernel - 1` raw `xBC` columns before each block,
      `(B * nb, conv_dim, K - 1)`;
    - `ssm_states`: the SSM state each block's scan starts from, `(B * nb, heads, head_dim, state)`;
    - `attention_mask`: additive, over `[context keys | block keys]`, or None when every key is visible;
    - `num_blocks`: noisy blocks per row (1 at inference, every block of the sequence in training);
    - `blockwise`: training's block structure without a dense mask (block `b` sees context keys `< b * S` and its own
      block), with `key_padding`, additive over `[context keys | block keys]`, or None when every key is real;
    - `joint_keys`, `joint_values` (inference views): per attention layer a `(B, kv_heads, T + S, head_dim)` buffer
      whose first T positions hold the context K/V (`keys`/`values` are views of them); each step writes its block's
      K/V into the tail instead of concatenating the whole context again.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    conv_history: dict[int, torch.Tensor]
    ssm_states: dict[int, torch.Tensor]
    attention_mask: torch.Tensor | None
    num_blocks: int = 1
    blockwise: bool = False
    key_padding: torch.Tensor | None = None
    joint_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    joint_values: dict[int, torch.Tensor] = field(default_factory=dict)

    def select_rows(self, rows: torch.LongTensor) -> "DenoiserContext":
        """The view of these rows only (inference: one block per row), each tensor gathered on its own device."""
        if self.num_blocks != 1:
            raise ValueError("Only a one-block (inference) view can be narrowed to some of its rows.")
        pick = lambda tensors: {i: x.index_select(0, rows.to(x.device)) for i, x in tensors.items()}  # noqa: E731
        mask = self.attention_mask
        if mask is not None:
            mask = mask.index_select(0, rows.to(mask.device))
        keys, values = pick(self.joint_keys or self.keys), pick(self.joint_values or self.values)
        view = DenoiserContext(keys, values, pick(self.conv_history), pick(self.ssm_states), mask)
        if self.joint_keys:  # the gathered tensors are [context | block] buffers: view the context in them
            length = self.context_length
            view.joint_keys, view.joint_values = keys, values
            view.keys = {i: buffer[:, :, :length] for i, buffer in keys.items()}
            view.values = {i: buffer[:, :, :length] for i, buffer in values.items()}
        return view

    @property
    def context_length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def with_joint_buffers(self, block_length: int) -> "DenoiserContext":
        """Give an inference view its `[context | block]` K/V buffers (one copy of the context per view)."""
        length = self.context_length
        for tensors, buffers in ((self.keys, self.joint_keys), (self.values, self.joint_values)):
            for i, tensor in list(tensors.items()):
                buffer = tensor.new_empty(*tensor.shape[:2], length + block_length, tensor.shape[3])
                buffer[:, :, :length] = tensor
                buffers[i], tensors[i] = buffer, buffer[:, :, :length]
        return self


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `visible` -> 0 where visible, the dtype's most negative value elsewhere (finite: no NaN rows)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def check_prompt_ids(input_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a non-empty (batch, length) tensor, got {shape}.")


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
    """The denoiser's view of a context for `nb = len(context_ends)` noisy blocks per row (one function for inference
    and training).

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
    dtype = next(iter(keys.values())).dtype if keys else torch.float32
    if num_blocks > 1:
        key_padding = None if key_real.all() else additive_mask(key_real, dtype)
        return DenoiserContext(keys, values, conv_history, ssm_states, None, num_blocks, True, key_padding)

    mask = None
    device, length = context_real.device, context_real.shape[1]
    if not key_real.all() or context_ends[0] < length:  # (training's one block sees no context: < 0 * S)
        sees_context = torch.arange(length, device=device)[None, :] < context_ends[0]  # (1, T)
        sees_block = torch.ones(block_length, block_length, dtype=torch.bool, device=device)
        visible = torch.cat([sees_context.expand(block_length, -1), sees_block], dim=1)[None]  # (1, L, T + L)
        mask = additive_mask((visible & key_real[:, None, :])[:, None], dtype)  # (B, 1, L, T + L)
    return DenoiserContext(keys, values, conv_history, ssm_states, mask, num_blocks)


class TwoTowerCache(DynamicCache):
    """Everything the context tower has computed about the prompt and the committed tokens.

    transformers' hybrid `DynamicCache` (K/V per attention layer; conv and SSM state per Mamba layer) plus:

    - `attention_mask` `(B, T)`: 1 for real context tokens, 0 for left padding;
    - `next_token_logits` `(B, V)`, fp32: the context tower's prediction after the last context token;
    - `mamba_states_behind`: `{layer: (conv_state, ssm_state)}` before the last context token, or None when the cache
      does not keep them (a one-pass prefill, or a multi-token extension);
    - `num_context_tokens`: how many token columns the context tower has processed into this cache.

    `TwoTowerContextTower` writes it, and generation drops finished rows from it (`keep_rows`); the denoiser reads it
    through `denoiser_context`.
    """

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config=config)
        self.mamba_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "linear_attention"]
        self.attention_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "full_attention"]
        self.attention_mask: torch.Tensor | None = None
        self.next_token_logits: torch.Tensor | None = None
        self.mamba_states_behind: MambaStates | None = None
        self.num_context_tokens = 0
        # Set by `training_context` for its one pass: the Mamba states at every block start, per Mamba layer.
        self.block_size: int | None = None
        self.block_starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views: dict[tuple, DenoiserContext] = {}

    @property
    def context_length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def mamba_states(self) -> MambaStates:
        """`{layer: (conv_state (B, conv_dim, K), ssm_state (B, heads, head_dim, state))}`, the live tensors."""
        return {i: (self.layers[i].conv_states[0], self.layers[i].recurrent_states[0]) for i in self.mamba_layers}

    def snapshot_mamba_states(self) -> MambaStates:
        """A copy of the Mamba states (the cache updates them in place)."""
        return {i: (conv.clone(), ssm.clone()) for i, (conv, ssm) in self.mamba_states().items()}

    @torch.compiler.disable  # bookkeeping (a memo of views), no math worth compiling
    def denoiser_context(
        self, block_length: int, behind: bool = False, rows: torch.LongTensor | None = None
    ) -> DenoiserContext:
        """The denoiser's view of this context for one block of `block_length` tokens per row, memoised until the
        context tower writes again. `behind=True` is Mock-AR's view, the context one token behind. `rows` narrows it
        to some of the cache's rows (in that order)."""
        key = (self.num_context_tokens, block_length, behind, None if rows is None else tuple(rows.tolist()))
        if key not in self._views:
            self._views = {k: v for k, v in self._views.items() if k[0] == self.num_context_tokens}
            if rows is None:
                self._views[key] = self._build_view(block_length, behind)
            else:
                self._views[key] = self.denoiser_context(block_length, behind).select_rows(rows)
        return self._views[key]

    def keep_rows(self, rows: torch.LongTensor) -> None:
        """Keep only these rows of the batch (in this order), in every tensor the cache holds; generation drops the
        rows that have finished, so that neither tower computes for them again."""
        self.reorder_cache(rows)  # transformers' per-layer row gather: K/V, conv and SSM states
        pick = lambda x: None if x is None else x.index_select(0, rows.to(x.device))  # noqa: E731
        self.attention_mask = pick(self.attention_mask)
        self.next_token_logits = pick(self.next_token_logits)
        if self.mamba_states_behind is not None:
            self.mamba_states_behind = {i: (pick(c), pick(s)) for i, (c, s) in self.mamba_states_behind.items()}
        self._views = {}

    def _build_view(self, block_length: int, behind: bool) -> DenoiserContext:
        if self.attention_mask is None:
            raise ValueError("The cache is empty: build it with `model.prefill(input_ids)` first.")
        end = self.context_length - 1 if behind else self.context_length
        if not behind:
            states = self.mamba_states()
        elif self.mamba_states_behind is None:
            raise ValueError(
                "This cache holds no Mamba states one token behind (it was read in one pass, or its last extension "
                "was a multi-token block); Mock-AR needs a cache built by `prefill` and extended one token at a time."
            )
        else:
            states = self.mamba_states_behind
        keys = {i: self.layers[i].keys[:, :, :end] for i in self.attention_layers}
        values = {i: self.layers[i].values[:, :, :end] for i in self.attention_layers}
        conv_history = {i: conv[..., 1:] for i, (conv, _) in states.items()}
        ssm_states = {i: ssm for i, (_, ssm) in states.items()}
        view = denoiser_view(keys, values, conv_history, ssm_states, self.attention_mask[:, :end], [end], block_length)
        return view.with_joint_buffers(block_length)


class ContextMamba2Mixer(TwoTowerMamba2Mixer):
    """The context tower's Mamba-2 mixer: Nemotron-H's forward, plus two cases Nemotron-H does not have:

    - appending a committed block (several tokens) to a cache that already holds a state: the seeded scan;
    - a training cache (`block_size` set): one pass over the whole clean sequence that also records the state at
      every block start, which each block's denoiser scan starts from.
    """

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        if cache_params is None or hidden_states.shape[1] == 1:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        if getattr(cache_params, "block_size", None) is not None:  # a training cache
            batch_size = hidden_states.shape[0]
            conv_history = hidden_states.new_zeros(batch_size, self.conv_dim, self.conv_kernel_size - 1)
            ssm_state = torch.zeros(
                batch_size, self.num_heads, self.head_dim, self.ssm_state_size, device=hidden_states.device
            )
            gate, conv_inputs, x, dt, B, C = self.scan_inputs(hidden_states, conv_history, attention_mask)
            y, _ = self.scan_from(x, dt, B, C, ssm_state)
            cache_params.block_starts[self.layer_idx] = block_start_states(
                conv_inputs, x, dt, self.ssm_decay_rates, B, ssm_state, cache_params.block_size, self.conv_kernel_size
            )
            return self.gated_output(y, gate, hidden_states.dtype)
        if not cache_params.has_previous_state(self.layer_idx):
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        conv_state = cache_params.get_conv_state(self.layer_idx)
        ssm_state = cache_params.get_recurrent_state(self.layer_idx)
        out, new_conv_state, new_ssm_state = self.seeded_scan(
            hidden_states, conv_state[..., 1:], ssm_state, attention_mask
        )
        conv_state.copy_(new_conv_state)  # in place: the cache's tensors keep their addresses
        ssm_state.copy_(new_ssm_state)
        return out


class TwoTowerContextBlock(TwoTowerBlock):
    mixer_types = {**MIXER_TYPES, "linear_attention": ContextMamba2Mixer}


class TwoTowerContextTower(TwoTowerPreTrainedModel, NemotronHModel):
    """The frozen autoregressive tower: Nemotron-H (`embeddings`, `layers`, `norm_f`) and its head `lm_head`.

    `forward` is Nemotron-H's (hidden states); `prefill`, `extend` and `training_context` write caches and views.
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

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, keep_behind: bool = True
    ) -> TwoTowerCache:
        """Read left-padded prompts `(B, T)` into a new cache.

        With `keep_behind` the prompt is read as the release reads it, in two passes (all but the last token, then
        the last token), so that the cache also holds the Mamba states one token behind; without, in one pass.
        """
        mask = check_left_padded(input_ids, attention_mask)
        cache = TwoTowerCache(self.config)
        if not keep_behind:
            hidden = self._append(cache, input_ids, mask)
        else:
            if input_ids.shape[1] > 1:
                self._append(cache, input_ids[:, :-1], mask[:, :-1])
                behind = cache.snapshot_mamba_states()
            else:
                behind = self.zero_mamba_states(input_ids.shape[0], input_ids.device)
            hidden = self._append(cache, input_ids[:, -1:], mask)
            cache.mamba_states_behind = behind
        cache.next_token_logits = self.next_token_logits(hidden[:, -1])
        return cache

    @torch.no_grad()
    def extend(self, cache: TwoTowerCache, token_ids: torch.LongTensor, keep_behind: bool = True) -> TwoTowerCache:
        """Append committed tokens `(B, L)` to the cache. A single token keeps the states behind it (unless
        `keep_behind=False`); a multi-token block does not."""
        batch_size = cache.attention_mask.shape[0]
        if token_ids.dim() != 2 or token_ids.shape[0] != batch_size or token_ids.shape[1] == 0:
            raise ValueError(
                f"`token_ids` must have shape (batch={batch_size}, length >= 1), got {tuple(token_ids.shape)}."
            )
        behind = cache.snapshot_mamba_states() if keep_behind and token_ids.shape[1] == 1 else None
        mask = torch.cat([cache.attention_mask, torch.ones_like(token_ids)], dim=1)
        hidden = self._append(cache, token_ids, mask)
        cache.mamba_states_behind = behind
        cache.next_token_logits = self.next_token_logits(hidden[:, -1])
        return cache

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
        cache = TwoTowerCache(self.config)
        cache.block_size = block_size
        self._append(cache, input_ids, attention_mask)
        keys = {i: cache.layers[i].keys for i in cache.attention_layers}
        values = {i: cache.layers[i].values for i in cache.attention_layers}
        conv_history = {i: conv.flatten(0, 1) for i, (conv, _) in cache.block_starts.items()}  # (B * nb, ...)
        ssm_states = {i: ssm.flatten(0, 1) for i, (_, ssm) in cache.block_starts.items()}
        ends = [b * block_size for b in range(num_blocks)]
        return denoiser_view(keys, values, conv_history, ssm_states, attention_mask, ends, block_size, attention_mask)

    def zero_mamba_states(self, batch_size: int, device: torch.device) -> MambaStates:
        """The Mamba states of an empty context, on `device` (weights may be offloaded, so not theirs)."""
        mixer = next(layer.mixer for layer in self.layers if layer.block_type == "linear_attention")
        conv = torch.zeros(
            batch_size, mixer.conv_dim, mixer.conv_kernel_size, dtype=mixer.in_proj.weight.dtype, device=device
        )
        ssm = torch.zeros(
            batch_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, dtype=torch.float32, device=device
        )
        return {
            layer.layer_idx: (conv.clone(), ssm.clone())
            for layer in self.layers
            if layer.block_type == "linear_attention"
        }

    def _append(self, cache: TwoTowerCache, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run over `token_ids` (B, L) into the cache; `attention_mask` covers the whole context, these tokens
        included. Returns the last hidden states (B, L, H)."""
        cache.attention_mask = attention_mask
        hidden = self(
            input_ids=token_ids,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        cache.num_context_tokens += token_ids.shape[1]
        return hidden


__all__ = [
    "DenoiserContext",
    "TwoTowerCache",
    "TwoTowerContextTower",
    "check_left_padded",
    "check_prompt_ids",
    "denoiser_view",
]
