"""What both towers share: transformers' Nemotron-H backbone, with the release's `dt` clamp and a seeded Mamba scan.

- `TwoTowerPreTrainedModel`: the base class of the model and of both towers (Nemotron-H's initialisation).
- `TwoTowerMamba2Mixer`: Nemotron-H's Mamba-2 mixer, clamping `dt` with the config's `time_step_limit`, plus
  `seeded_scan`, a block that continues from a given Mamba state. The context tower uses it to append a committed
  block to its cache; the denoiser uses it to start every scan from the context's state.
- `TwoTowerBlock`: a Nemotron-H block whose mixer comes from its tower's own mixer table.

See docs/architecture.md ("The backbone", "Context-seeded Mamba").
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.nemotron_h.modeling_nemotron_h import (
    MIXER_TYPES,
    NemotronHBlock,
    NemotronHMamba2Mixer,
    NemotronHPreTrainedModel,
    NemotronHRMSNorm,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    mamba2_chunk_scan,
)

from .configuration_twotower import TwoTowerConfig


def uses_package_kernel(function) -> bool:
    """Whether transformers bound one of Nemotron-H's kernelized functions to its package (mamba-ssm,
    causal-conv1d) rather than to its torch fallback. Read from the wrapper transformers builds; if that ever changes
    shape, the answer is True, which only costs the short-block shortcuts below, never exactness."""
    try:
        return bool(inspect.getclosurevars(function).nonlocals.get("is_new_implementation", True))
    except (TypeError, ValueError):
        return True


# Without the packages, a block no longer than a chunk (every denoiser step, every block extension) is cheaper on
# the shortcuts below than through the torch fallbacks (docs/architecture.md, "Speed"); with them, the kernels.
SHORT_BLOCK_CONV = not uses_package_kernel(causal_conv1d_fn)
SHORT_BLOCK_SCAN = not uses_package_kernel(mamba2_chunk_scan)


def short_causal_conv(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int):
    """The depthwise causal conv's last `length` outputs, one multiply-add per tap (no convolution call).
    inputs (B, C, K - 1 + length); weight (C, K); returns (B, C, length), before the activation."""
    kernel = weight.shape[-1]
    out = (
        inputs[..., :length] * weight[:, :1]
        if bias is None
        else torch.addcmul(bias[:, None], inputs[..., :length], weight[:, :1])
    )
    for k in range(1, kernel):
        out = torch.addcmul(out, inputs[..., k : k + length], weight[:, k : k + 1])
    return out


def one_chunk_scan(x, dt, A, B, C, D, h0) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan of a block no longer than a chunk, from state `h0`, as one quadratic form (what the chunked scan
    computes inside a chunk, without its chunk and state-passing steps), fp32:

        y_t = D x_t + C_t . (exp(a_1 + ... + a_t) h0 + sum_{s <= t} exp(a_{s+1} + ... + a_t) dt_s x_s B_s^T),  a = dt A

    x (b, L, heads, hd); dt (b, L, heads); A, D (heads,); B, C (b, L, groups, N); h0 (b, heads, hd, N).
    Returns y (b, L, heads, hd) and the state after the block (b, heads, hd, N).
    """
    length, heads = x.shape[1], x.shape[2]
    per_group = heads // B.shape[2]
    cumulative = (dt * A).transpose(1, 2).cumsum(-1)  # (b, heads, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, -math.inf).exp()  # (b, h, t, s)
    B = B.transpose(1, 2).repeat_interleave(per_group, dim=1)  # (b, heads, L, N)
    C = C.transpose(1, 2).repeat_interleave(per_group, dim=1)
    x = x.transpose(1, 2)  # (b, heads, L, hd)
    dt = dt.transpose(1, 2)  # (b, heads, L)
    # [C B^T * decay * dt_s | C exp(cumulative)] @ [x ; h0^T]: the block's own inputs and the given state, one product.
    scores = (C @ B.transpose(-1, -2)) * decay * dt[..., None, :]
    readout = torch.cat([scores, C * cumulative.exp()[..., None]], dim=-1)
    y = readout @ torch.cat([x, h0.transpose(-1, -2)], dim=-2) + D[:, None, None] * x
    to_end = (cumulative[..., -1:] - cumulative).exp() * dt  # (b, heads, L)
    state = (x * to_end[..., None]).transpose(-1, -2) @ B + cumulative[..., -1].exp()[..., None, None] * h0
    return y.transpose(1, 2), state


class TwoTowerPreTrainedModel(NemotronHPreTrainedModel):
    config_class = TwoTowerConfig
    config: TwoTowerConfig
    base_model_prefix = "denoiser_tower"
    _no_split_modules = ["TwoTowerContextBlock", "TwoTowerDenoiserBlock"]
    _supports_flash_attn = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # transformers detects MoE support by looking for `@use_experts_implementation` in the class's module source; the
    # experts here are Nemotron-H's (which has it), so say so and get the same `grouped_mm` experts.
    _can_set_experts_implementation_cached_value = True


class TwoTowerMamba2Mixer(NemotronHMamba2Mixer):
    """Nemotron-H's Mamba-2 mixer with the release's `dt` clamp, plus a scan that continues from a given state."""

    def __init__(self, config: TwoTowerConfig, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        # transformers clamps dt from below at `time_step_min`; the release clamps with `time_step_limit` ([0, inf]).
        self.time_step_limit = tuple(config.time_step_limit)

    @force_accelerate_hooks("conv1d")  # the conv weight is read directly, not through `conv1d`'s forward
    def seeded_scan(
        self,
        hidden_states: torch.Tensor,
        conv_history: torch.Tensor,
        ssm_state: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Run the mixer over a block that continues a sequence whose Mamba state is given.

        hidden_states: (B, L, H); conv_history: (B, conv_dim, K - 1), the last raw xBC inputs before the block;
        ssm_state: (B, heads, hd, N); attention_mask (B, L): 0 at left padding, which then contributes nothing.
        Returns the output (B, L, H) and the state after the block: the last K raw xBC inputs (B, conv_dim, K) and
        the SSM state (B, heads, hd, N), fp32. With `block_size`, also the state at the start of every block of that
        size: conv histories (B, nb, conv_dim, K - 1) and SSM states (B, nb, heads, hd, N).
        """
        batch_size, length, _ = hidden_states.shape
        gate, xBC, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )

        # 1. Causal conv over [history | block]; keep the block's outputs. The given state may live on another
        # device (the context tower's): it moves to this layer.
        history = conv_history.to(device=xBC.device, dtype=xBC.dtype)
        conv_inputs = torch.cat([history, xBC.transpose(1, 2)], dim=-1)  # (B, conv_dim, K - 1 + L)
        # Compiled, a short block always takes the torch forms: inductor fuses them, and the packages' kernels would
        # break the graph.
        short = length <= self.chunk_size
        compiling = torch.compiler.is_compiling()
        if short and (SHORT_BLOCK_CONV or compiling):
            xBC = self.act(short_causal_conv(conv_inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, length))
        else:
            xBC = causal_conv1d_fn(
                conv_inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation
            )[..., -length:]
        xBC = apply_mask_to_padding_states(xBC.transpose(1, 2), attention_mask)  # (B, L, conv_dim)
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        x = x.float().reshape(batch_size, length, self.num_heads, self.head_dim)
        B = B.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size)
        C = C.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size)

        # 2. SSM scan in fp32. The scan is linear in its state: scan(x; h0) = scan(x; 0) + h0 decayed and read by C.
        # So the chunked kernel always starts from zero (it has been reported wrong with an initial state and a
        # block shorter than its chunk) and the given state enters exactly, in closed form. Without the kernel, a
        # short block is one quadratic form with the state folded in.
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (B, L, heads)
        A = -torch.exp(self.A_log.float())  # (heads,)
        h0 = ssm_state.to(device=x.device, dtype=torch.float32)
        heads_per_group = self.num_heads // self.n_groups
        if short and (SHORT_BLOCK_SCAN or compiling):
            y, final_state = one_chunk_scan(x, dt, A, B, C, self.D.float(), h0)
        else:
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
            decay = torch.exp(torch.cumsum(dt * A, dim=1))  # (B, L, heads): decay of h0 up to and including step t
            C_heads = C.repeat_interleave(heads_per_group, dim=2)  # (B, L, heads, N)
            y = y + torch.einsum("blhn,bhpn->blhp", C_heads, h0) * decay[..., None]
            final_state = zero_start_state + decay[:, -1, :, None, None] * h0

        # 3. Gated group norm, output projection.
        y = self.norm(y.reshape(batch_size, length, -1), gate)
        out = self.out_proj(y.to(hidden_states.dtype))
        outputs = (out, conv_inputs[..., -self.conv_kernel_size :], final_state)
        if block_size is None:
            return outputs

        # 4. The state at every block start. Conv: the K - 1 raw inputs before it. SSM: block j's own contribution,
        # s_j = sum_t exp(a_{t+1} + ... + a_end) dt_t x_t B_t^T with a = dt A, then h_{j+1} = exp(a_block j) h_j + s_j.
        num_blocks = length // block_size
        kernel = self.conv_kernel_size
        conv_starts = torch.stack(
            [conv_inputs[..., b * block_size : b * block_size + kernel - 1] for b in range(num_blocks)], dim=1
        )  # (B, nb, conv_dim, K - 1)
        blocked = lambda t: t[:, : num_blocks * block_size].unflatten(1, (num_blocks, block_size))  # noqa: E731
        a = blocked(dt * A)  # (B, nb, S, heads)
        cumulative = torch.cumsum(a, dim=2)
        to_block_end = torch.exp(cumulative[:, :, -1:] - cumulative)  # (B, nb, S, heads)
        B_heads = blocked(B).repeat_interleave(heads_per_group, dim=3)  # (B, nb, S, heads, N)
        own = torch.einsum("bcsh,bcshp,bcshn->bchpn", to_block_end * blocked(dt), blocked(x), B_heads)
        block_decay = torch.exp(cumulative[:, :, -1])  # (B, nb, heads)
        ssm_starts, state = [], h0
        for b in range(num_blocks):
            ssm_starts.append(state)
            state = block_decay[:, b, :, None, None] * state + own[:, b]
        return outputs + ((conv_starts, torch.stack(ssm_starts, dim=1)),)


class TwoTowerBlock(NemotronHBlock):
    """A Nemotron-H block (pre-norm residual) whose mixer comes from `mixer_types`, its tower's table."""

    mixer_types = MIXER_TYPES

    def __init__(self, config: TwoTowerConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.block_type = config.layers_block_type[layer_idx]
        self.mixer = self.mixer_types[self.block_type](config, layer_idx=layer_idx)


__all__ = ["TwoTowerBlock", "TwoTowerMamba2Mixer", "TwoTowerPreTrainedModel"]
