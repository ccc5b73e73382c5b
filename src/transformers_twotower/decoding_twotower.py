"""Static decoding: one fixed-address state for both towers, and the three steps generation is made of
(docs/architecture.md, "Static decoding").

- `TwoTowerDecodeState` preallocates everything the towers read and write after the prompt: per attention layer one
  K/V buffer `(B, kv_heads, max_length + S, hd)` whose first `max_length` positions hold the context and whose last
  `S` positions are the denoiser's block region; per Mamba layer the conv and SSM states (and, for Mock-AR, the states
  one token behind); which context positions are real; and the context length, a tensor.
- `context_step` appends committed tokens to it (one token: the AR decode step; a block: the block extension) and
  returns the next-token logits; `denoise_step` runs the denoiser over a noisy block after it and returns the block's
  logits. Neither syncs with the host, branches on a tensor's value, or changes a shape between steps or blocks, so
  each compiles with `fullgraph=True` and, on CUDA, replays as one CUDA graph.
- `StaticSteps` is what generation calls: the steps bound to a state, compiled once per model, compile config and
  state shape.

The denoiser reads the context K/V where the context tower wrote them: no copy of the context per block or step.
"""

import torch
from transformers import CompileConfig

from .context_twotower import DenoiserContext, TwoTowerCache, additive_mask


class TwoTowerDecodeState:
    """The fixed-address state both towers decode from (built once per batch size, maximum length and block size).

    keys, values: `{layer: (B, kv_heads, max_length + block_size, hd)}`; positions `< max_length` are the context
        (written by the context tower), the last `block_size` the denoiser's block;
    conv, ssm: `{layer: (B, conv_dim, K)}` raw xBC inputs and `{layer: (B, heads, hd, N)}` fp32 SSM states;
    conv_behind, ssm_behind: the same one token behind (Mock-AR), or empty;
    key_real: `(B, max_length + block_size)` bool, True at real context positions (never in the block region);
    length: 0-d long tensor, the context positions written so far (all rows share it: prompts are left-padded).
    """

    def __init__(self, cache: TwoTowerCache, max_length: int, block_size: int, keep_behind: bool):
        batch_size = cache.attention_mask.shape[0]
        self.max_length, self.block_size, self.keep_behind = max_length, block_size, keep_behind
        width = max_length + block_size
        self.keys, self.values, self.conv, self.ssm, self.conv_behind, self.ssm_behind = {}, {}, {}, {}, {}, {}
        for i in cache.attention_layers:
            keys = cache.layers[i].keys
            self.keys[i] = keys.new_zeros(batch_size, keys.shape[1], width, keys.shape[3])
            self.values[i] = keys.new_zeros(batch_size, keys.shape[1], width, keys.shape[3])
        for i, (conv, ssm) in cache.mamba_states().items():
            self.conv[i], self.ssm[i] = torch.zeros_like(conv), torch.zeros_like(ssm)
            if keep_behind:
                self.conv_behind[i], self.ssm_behind[i] = torch.zeros_like(conv), torch.zeros_like(ssm)
        device = cache.attention_mask.device
        self.key_real = torch.zeros(batch_size, width, dtype=torch.bool, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        for tensor in self.tensors():
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs may read and write them in place

    def tensors(self) -> list[torch.Tensor]:
        buffers = [self.keys, self.values, self.conv, self.ssm, self.conv_behind, self.ssm_behind]
        return [t for group in buffers for t in group.values()] + [self.key_real, self.length]

    @torch.no_grad()
    def load(self, cache: TwoTowerCache) -> "TwoTowerDecodeState":
        """Copy a prefilled cache in: its K/V to the first positions, its Mamba states, which positions are real."""
        length = cache.context_length
        if length > self.max_length:
            raise ValueError(f"A context of {length} tokens does not fit a state of {self.max_length} positions.")
        if self.keep_behind and cache.mamba_states_behind is None:
            raise ValueError("This state keeps the Mamba states one token behind, and the cache holds none.")
        for i in self.keys:
            self.keys[i][:, :, :length].copy_(cache.layers[i].keys)
            self.values[i][:, :, :length].copy_(cache.layers[i].values)
        for i, (conv, ssm) in cache.mamba_states().items():
            self.conv[i].copy_(conv)
            self.ssm[i].copy_(ssm)
            if self.keep_behind:
                self.conv_behind[i].copy_(cache.mamba_states_behind[i][0])
                self.ssm_behind[i].copy_(cache.mamba_states_behind[i][1])
        self.key_real.zero_()
        self.key_real[:, :length] = cache.attention_mask.bool()
        self.length.fill_(length)
        return self


def attend_into_state(attention, hidden_states, keys, values, positions, mask):
    """The context tower's attention over the state: this block's K/V are written at `positions` of the layer's
    buffers, then the queries attend over the whole buffer under `mask` (B, 1, L, width) bool."""
    batch_size, length, _ = hidden_states.shape
    shape = (batch_size, length, -1, attention.head_dim)
    query = attention.q_proj(hidden_states).view(shape).transpose(1, 2)
    keys.index_copy_(2, positions, attention.k_proj(hidden_states).view(shape).transpose(1, 2))
    values.index_copy_(2, positions, attention.v_proj(hidden_states).view(shape).transpose(1, 2))
    output = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=True
    )  # (B, heads, L, hd)
    return attention.o_proj(output.transpose(1, 2).reshape(batch_size, length, -1))


def context_step(model, state: TwoTowerDecodeState, token_ids: torch.LongTensor, keep_behind: bool) -> torch.Tensor:
    """Append committed tokens `(B, L)` to the state (L = 1: the AR decode step; a block: the extension) and return
    the next-token logits after them, `(B, V)` fp32. With `keep_behind`, the Mamba states before them are kept."""
    tower = model.context_tower
    length = token_ids.shape[1]
    positions = state.length + torch.arange(length, device=state.length.device)  # (L,)
    state.key_real.index_fill_(1, positions, True)
    key_positions = torch.arange(state.key_real.shape[1], device=positions.device)
    causal = key_positions[None, :] <= positions[:, None]  # (L, width)
    mask = (state.key_real[:, None, :] & causal[None])[:, None]  # (B, 1, L, width)
    hidden = tower.embeddings(token_ids)
    for layer in tower.layers:
        i = layer.layer_idx
        normed = layer.norm(hidden.to(layer.norm.weight.dtype))
        if layer.block_type == "linear_attention":
            if keep_behind:
                state.conv_behind[i].copy_(state.conv[i])
                state.ssm_behind[i].copy_(state.ssm[i])
            out, conv, ssm = layer.mixer.seeded_scan(normed, state.conv[i][..., 1:], state.ssm[i])
            state.conv[i].copy_(conv)
            state.ssm[i].copy_(ssm)
        elif layer.block_type == "full_attention":
            out = attend_into_state(layer.mixer, normed, state.keys[i], state.values[i], positions, mask)
        else:
            out = layer.mixer(normed)
        hidden = hidden + out
    state.length.add_(length)
    return tower.next_token_logits(tower.norm_f(hidden[:, -1]))


def denoise_step(
    model, state: TwoTowerDecodeState, block_ids: torch.LongTensor, t: torch.Tensor | None, behind: bool
) -> torch.Tensor:
    """The denoiser's fp32 logits `(B, L, V)` for a noisy block `(B, L)`, `L <= block_size`, after the state's
    context (one token behind with `behind`: Mock-AR). The block's K/V go to the last `L` positions of the block
    region; nothing of the context is written."""
    length = block_ids.shape[1]
    width = state.key_real.shape[1]
    key_positions = torch.arange(width, device=state.length.device)
    visible = (state.key_real & (key_positions < state.length - int(behind))) | (key_positions >= width - length)
    dtype = next(iter(state.keys.values())).dtype if state.keys else torch.float32
    conv, ssm = (state.conv_behind, state.ssm_behind) if behind else (state.conv, state.ssm)
    context = DenoiserContext(
        keys={i: k[:, :, : state.max_length] for i, k in state.keys.items()},
        values={i: v[:, :, : state.max_length] for i, v in state.values.items()},
        conv_history={i: c[..., 1:] for i, c in conv.items()},
        ssm_states=ssm,
        attention_mask=additive_mask(visible[:, None, None, :], dtype),
        joint_keys=state.keys,
        joint_values=state.values,
    )
    hidden = model.denoiser_tower(block_ids, context, t).last_hidden_state
    return model.lm_head(hidden).float()


class StaticSteps:
    """The three steps bound to one state: `ar_step(token_ids)`, `extend(block_ids, keep_behind)` and
    `denoise(block_ids, t, behind)`, each eager or compiled with `fullgraph=True`.

    Compiled functions are kept on the model per compile config (`model._static_step_functions`), so that a later
    `generate` with the same batch size and maximum length reuses the state and replays what it compiled."""

    def __init__(self, model, state: TwoTowerDecodeState, compile_config: CompileConfig | None):
        self.model, self.state = model, state
        self.context_step, self.denoise_step = context_step, denoise_step
        if compile_config is not None:
            functions = model.__dict__.setdefault("_static_step_functions", {})
            key = repr(sorted(compile_config.to_dict().items()))
            if key not in functions:
                options = {**compile_config.to_dict(), "fullgraph": True}
                functions[key] = (torch.compile(context_step, **options), torch.compile(denoise_step, **options))
            self.context_step, self.denoise_step = functions[key]

    def extend(self, token_ids: torch.LongTensor, keep_behind: bool = False) -> torch.Tensor:
        return self.context_step(self.model, self.state, token_ids, keep_behind)

    def denoise(self, block_ids: torch.LongTensor, t: torch.Tensor | None, behind: bool = False) -> torch.Tensor:
        return self.denoise_step(self.model, self.state, block_ids, t, behind)


def decode_state(model, cache: TwoTowerCache, max_length: int, block_size: int, keep_behind: bool):
    """The model's decode state for this cache's batch and these lengths, loaded with the cache. The state of the
    last call is reused when it has the same shape, dtype and device (fixed addresses across calls: CUDA graphs
    replay); otherwise a new one replaces it."""
    reference = cache.layers[cache.attention_layers[0] if cache.attention_layers else cache.mamba_layers[0]]
    sample = reference.keys if cache.attention_layers else reference.conv_states[0]
    key = (cache.attention_mask.shape[0], max_length, block_size, keep_behind, sample.dtype, sample.device)
    kept = model.__dict__.get("_decode_state")
    if kept is None or kept[0] != key:
        kept = (key, TwoTowerDecodeState(cache, max_length, block_size, keep_behind))
        model.__dict__["_decode_state"] = kept
    return kept[1].load(cache)


__all__ = ["StaticSteps", "TwoTowerDecodeState", "context_step", "decode_state", "denoise_step"]
