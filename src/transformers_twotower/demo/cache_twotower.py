"""The context cache: written only by the context tower, read (never written) by the denoiser.

`TwoTowerCache` is transformers' own hybrid `DynamicCache` (K/V for attention layers, conv + SSM state for Mamba
layers) plus what TwoTower adds around it: the context's padding mask, the context tower's next-token logits, the
Mamba states one token behind (what Mock-AR reads), and a count of the tokens the context tower has processed.

`DenoiserContext` is the denoiser's read-only view of a context, per layer index:

- attention layers: the context K/V, shape `(B, kv_heads, T, head_dim)`;
- Mamba layers: the last `conv_kernel - 1` raw `xBC` columns `(B * nb, conv_dim, K - 1)` and the SSM state
  `(B * nb, heads, head_dim, state)` the scan starts from;
- an additive attention mask over `[context keys | block keys]`, or `None` when every key is visible.

At inference there is one noisy block per row (`num_blocks == 1`). In training every block of a sequence is
denoised at once (`num_blocks == nb`): the Mamba seeds are per block, and the attention mask lets block `b` see
context positions `< b * S` and its own block only.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class DenoiserContext:
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    conv_history: dict[int, torch.Tensor]
    ssm_states: dict[int, torch.Tensor]
    attention_mask: torch.Tensor | None
    num_blocks: int = 1


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `visible` -> 0 where visible, the dtype's most negative value elsewhere (finite: no NaN rows)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def check_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a prompt batch for the context tower and return its mask as 0/1 longs.

    Only left padding is accepted: transformers' Nemotron-H lets the SSM state decay over right padding.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a non-empty (batch, length) tensor, got {shape}.")
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


class TwoTowerCache(DynamicCache):
    """Everything the context tower has computed about the prompt and the committed tokens.

    Build it with `model.prefill(...)` and grow it with `model.extend_context(...)`; the denoiser reads it through
    `denoiser_context()`. Attributes:

    - `attention_mask` `(B, T)`: 1 for real context tokens, 0 for left padding.
    - `next_token_logits` `(B, V)`, fp32: the context tower's prediction after the last context token.
    - `previous_mamba_states`: `{layer: (conv_state, ssm_state)}` before the last context token (Mock-AR reads the
      context one token behind), or `None` when the last extension was a multi-token block.
    - `num_context_tokens`: how many token columns the context tower has processed into this cache.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.config = config
        self.mamba_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "linear_attention"]
        self.attention_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "full_attention"]
        self.attention_mask: torch.Tensor | None = None
        self.next_token_logits: torch.Tensor | None = None
        self.previous_mamba_states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.num_context_tokens = 0
        self._views: dict[tuple, DenoiserContext] = {}

    @property
    def context_length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def mamba_states(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`{layer: (conv_state (B, conv_dim, K), ssm_state (B, heads, head_dim, state))}`, the live tensors."""
        return {i: (self.layers[i].conv_states[0], self.layers[i].recurrent_states[0]) for i in self.mamba_layers}

    def snapshot_mamba_states(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the Mamba states (the cache updates them in place)."""
        return {i: (conv.clone(), ssm.clone()) for i, (conv, ssm) in self.mamba_states().items()}

    def record_written(self, num_tokens: int):
        """Called by the model after the context tower wrote `num_tokens` new columns; drops stale views."""
        self.num_context_tokens += num_tokens
        self._views.clear()

    def denoiser_context(self, block_length: int, behind: bool = False) -> DenoiserContext:
        """The denoiser's view of this context for a block of `block_length` tokens (memoised until the next write).

        `behind=True` is Mock-AR's view: the context without its last token (K/V without the last position, the Mamba
        states before it).
        """
        key = (block_length, behind)
        if key not in self._views:
            self._views[key] = self._build_view(block_length, behind)
        return self._views[key]

    def _build_view(self, block_length: int, behind: bool) -> DenoiserContext:
        if self.attention_mask is None:
            raise ValueError("The cache is empty: build it with `model.prefill(input_ids)` first.")
        end = self.context_length - 1 if behind else self.context_length
        if behind:
            if self.previous_mamba_states is None:
                raise ValueError(
                    "This cache holds no Mamba states one token behind (its last extension was a multi-token block); "
                    "Mock-AR needs a cache built by `prefill` and extended one token at a time."
                )
            states = self.previous_mamba_states
        else:
            states = self.mamba_states()
        keys = {i: self.layers[i].keys[:, :, :end] for i in self.attention_layers}
        values = {i: self.layers[i].values[:, :, :end] for i in self.attention_layers}
        conv_history = {i: conv[..., 1:] for i, (conv, _) in states.items()}
        ssm_states = {i: ssm for i, (_, ssm) in states.items()}

        context_visible = self.attention_mask[:, :end].bool()
        mask = None
        if not context_visible.all():
            batch_size = context_visible.shape[0]
            block_visible = context_visible.new_ones(batch_size, block_length)
            visible = torch.cat([context_visible, block_visible], dim=1)[:, None, None, :]  # (B, 1, 1, T + L)
            dtype = next(iter(keys.values())).dtype if keys else torch.float32
            mask = additive_mask(visible, dtype)
        return DenoiserContext(keys, values, conv_history, ssm_states, mask)


__all__ = ["TwoTowerCache", "DenoiserContext", "check_left_padded"]
