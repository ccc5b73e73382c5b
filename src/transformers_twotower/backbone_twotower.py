"""What both towers share: transformers' Nemotron-H backbone, with the release's `dt` clamp and a seeded Mamba scan.

- `TwoTowerPreTrainedModel`: the base class of the model and of both towers (Nemotron-H's initialisation).
- `TwoTowerMamba2Mixer`: Nemotron-H's Mamba-2 mixer, clamping `dt` with the config's `time_step_limit`, plus
  `seeded_scan`, a block that continues from a given Mamba state. The context tower uses it to append a committed
  block to its cache; the denoiser uses it to start every scan from the context's state.
- `TwoTowerBlock`: a Nemotron-H block whose mixer comes from its tower's own mixer table.

See docs/architecture.md ("The backbone", "Context-seeded Mamba").
"""

import functools
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
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
    mamba2_selective_state_update,
)

from .configuration_twotower import TwoTowerConfig


# What a tower records besides its output when asked, each off: a step of decoding passes these, so that a config
# that asks for them (`output_router_logits=True`, ...) does not make every step record.
RECORD_NOTHING = {"output_attentions": False, "output_hidden_states": False, "output_router_logits": False}


def package_provides(module: str, name: str) -> bool:
    """Whether `module` imports and defines `name`. transformers binds Nemotron-H's kernelized functions to their
    packages under the same condition (otherwise to its torch fallbacks), so this tells which path a call takes."""
    try:
        return callable(getattr(importlib.import_module(module), name, None))
    except Exception:  # a package that fails to import is one transformers falls back from as well
        return False


# Without the packages, a block no longer than a chunk (every denoiser step, every block extension) is cheaper on
# the shortcuts below than through the torch fallbacks (docs/architecture.md, "Speed"); with them, the kernels.
SHORT_BLOCK_CONV = not package_provides("causal_conv1d", "causal_conv1d_fn")
SHORT_BLOCK_SCAN = not package_provides("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
# With mamba-ssm, one token (an AR step) takes its recurrent kernel, one launch, rather than the chunked scan.
ONE_TOKEN_KERNEL = package_provides("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")


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

    @property
    def ssm_decay_rates(self) -> torch.Tensor:
        """`A` `(heads,)`, fp32: the state decays by `exp(dt * A)` per token."""
        return -torch.exp(self.A_log.float())

    def seeded_scan(
        self,
        hidden_states: torch.Tensor,
        conv_history: torch.Tensor,
        ssm_state: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the mixer over a block that continues a sequence whose Mamba state is given.

        hidden_states: (B, L, H); conv_history: (B, conv_dim, K - 1), the last raw xBC inputs before the block;
        ssm_state: (B, heads, hd, N); attention_mask (B, L): 0 at left padding, which then contributes nothing.
        Returns the output (B, L, H) and the state after the block: the last K raw xBC inputs (B, conv_dim, K) and
        the SSM state (B, heads, hd, N), fp32.
        """
        gate, conv_inputs, x, dt, B, C = self.scan_inputs(hidden_states, conv_history, attention_mask)
        y, state = self.scan_from(x, dt, B, C, ssm_state)
        return self.gated_output(y, gate, hidden_states.dtype), conv_inputs[..., -self.conv_kernel_size :], state

    # The three parts of Nemotron-H's torch path (`NemotronHMamba2Mixer.forward`), for a block after a given state.
    # Lines marked `TwoTower:` differ from it.

    @force_accelerate_hooks("conv1d")  # the conv weight is read directly, not through `conv1d`'s forward
    def scan_inputs(self, hidden_states, conv_history, attention_mask=None) -> tuple[torch.Tensor, ...]:
        """Projection and causal conv. Returns the gate (B, L, I), the raw conv inputs with the history before them
        (B, conv_dim, K - 1 + L), and the scan's fp32 inputs: x (B, L, heads, hd), dt (B, L, heads), B and C
        (B, L, groups, N)."""
        batch_size, length, _ = hidden_states.shape
        # TwoTower: padding in `hidden_states` is the caller's to zero (Nemotron-H zeroes it here, before `in_proj`).
        gate, xBC, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        # TwoTower: the conv runs over [history | block], the history given (it may live on the context tower's
        # device), instead of over the cache's conv state.
        history = conv_history.to(device=xBC.device, dtype=xBC.dtype)
        conv_inputs = torch.cat([history, xBC.transpose(1, 2)], dim=-1)  # (B, conv_dim, K - 1 + L)
        # TwoTower: a short block takes the per-tap form without the package, and always when compiled (inductor
        # fuses it; the package's kernel would break the graph).
        if length <= self.chunk_size and (SHORT_BLOCK_CONV or torch.compiler.is_compiling()):
            xBC = self.act(short_causal_conv(conv_inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, length))
        else:
            xBC = causal_conv1d_fn(
                conv_inputs, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation
            )[..., -length:]
        xBC = apply_mask_to_padding_states(xBC.transpose(1, 2), attention_mask)  # (B, L, conv_dim)
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        # TwoTower: dt is computed here, clamped with the release's `time_step_limit`; everything after is fp32.
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (B, L, heads)
        return (
            gate,
            conv_inputs,
            x.float().reshape(batch_size, length, self.num_heads, self.head_dim),
            dt,
            B.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size),
            C.float().reshape(batch_size, length, self.n_groups, self.ssm_state_size),
        )

    def scan_from(self, x, dt, B, C, ssm_state) -> tuple[torch.Tensor, torch.Tensor]:
        """The SSD scan from `ssm_state` (B, heads, hd, N), fp32: the output y (B, L, heads, hd) and the final state.

        The scan is linear in its state: scan(x; h0) = scan(x; 0) + h0 decayed and read by C. So the chunked kernel
        always starts from zero (it has been reported wrong with an initial state and a block shorter than its
        chunk) and the given state enters exactly, in closed form. Without the kernel, a short block is one
        quadratic form with the state folded in."""
        A, D = self.ssm_decay_rates, self.D.float()
        h0 = ssm_state.to(device=x.device, dtype=torch.float32)
        # TwoTower: the kernel has no backward; under autograd (a one-token training block) the torch forms run.
        if x.shape[1] == 1 and ONE_TOKEN_KERNEL and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.one_token_step(x, dt, A, B, C, D, h0)
        if x.shape[1] <= self.chunk_size and (SHORT_BLOCK_SCAN or torch.compiler.is_compiling()):  # TwoTower
            return one_chunk_scan(x, dt, A, B, C, D, h0)
        y, zero_start_state = mamba2_chunk_scan(
            x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), chunk_size=self.chunk_size, D=D,
            return_final_states=True,
        )  # TwoTower: no `initial_states`, dt already final  # fmt: skip
        # TwoTower: the given state, decayed up to and including each step and read by C.
        decay = torch.exp(torch.cumsum(dt * A, dim=1))  # (B, L, heads)
        C_heads = C.repeat_interleave(self.num_heads // self.n_groups, dim=2)  # (B, L, heads, N)
        y = y + torch.einsum("blhn,bhpn->blhp", C_heads, h0) * decay[..., None]
        return y, zero_start_state + decay[:, -1, :, None, None] * h0

    def one_token_step(self, x, dt, A, B, C, D, h0) -> tuple[torch.Tensor, torch.Tensor]:
        """One token from `h0` through transformers' recurrent update (mamba-ssm's `selective_state_update`), given
        the clamped `dt` (no bias or softplus there: the clamp stays in `scan_inputs`). Returns y (B, 1, heads, hd) and
        the state after the token."""
        state = h0.clone()  # updated in place by the kernel
        per_head = lambda t: t[:, None].expand(-1, self.head_dim)  # noqa: E731  (heads,) -> (heads, hd)
        y = mamba2_selective_state_update(
            state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, self.head_dim),
            per_head(A)[..., None].expand(-1, -1, self.ssm_state_size), B[:, 0], C[:, 0], per_head(D),
            dt_bias=per_head(torch.zeros_like(A)),  # zero, and given: mamba-ssm's kernel reads its stride
        )  # fmt: skip
        return y[:, None], state

    def gated_output(self, y: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Nemotron-H's gated group norm and output projection: y (B, L, heads, hd) -> (B, L, H)."""
        return self.out_proj(self.norm(y.flatten(2), gate).to(dtype))


def block_start_states(
    conv_inputs, x, dt, A, B, h0, block_size: int, kernel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba state at the start of every block of a scan (what `scan_inputs` and `scan_from` computed over a whole
    sequence from state h0), for training: each block's denoiser scan starts from it.

    Conv: the K - 1 raw inputs before each block start, (B, nb, conv_dim, K - 1). SSM: block j's own contribution
    s_j = sum_t exp(a_{t+1} + ... + a_end) dt_t x_t B_t^T with a = dt A, then h_{j+1} = exp(a_block j) h_j + s_j;
    (B, nb, heads, hd, N).
    """
    num_blocks = x.shape[1] // block_size
    conv_starts = torch.stack(
        [conv_inputs[..., b * block_size : b * block_size + kernel - 1] for b in range(num_blocks)], dim=1
    )
    blocked = lambda t: t[:, : num_blocks * block_size].unflatten(1, (num_blocks, block_size))  # noqa: E731
    a = blocked(dt * A)  # (B, nb, S, heads)
    cumulative = torch.cumsum(a, dim=2)
    to_block_end = torch.exp(cumulative[:, :, -1:] - cumulative)  # (B, nb, S, heads)
    B_heads = blocked(B).repeat_interleave(x.shape[2] // B.shape[2], dim=3)  # (B, nb, S, heads, N)
    own = torch.einsum("bcsh,bcshp,bcshn->bchpn", to_block_end * blocked(dt), blocked(x), B_heads)
    block_decay = torch.exp(cumulative[:, :, -1])  # (B, nb, heads)
    ssm_starts, state = [], h0
    for b in range(num_blocks):
        ssm_starts.append(state)
        state = block_decay[:, b, :, None, None] * state + own[:, b]
    return conv_starts, torch.stack(ssm_starts, dim=1)


def holds_sharded_weights(module: nn.Module) -> bool:
    """Whether tensor or expert parallelism split some of `module`'s weights across processes (they are DTensors)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def compiled_once_per_kind(forward):
    """Mark a block's `forward` as a region compiled once and reused by every block that traces to the same graph
    (`torch.compiler.nested_compile_region`): a compiled decoding step then compiles one block of each kind, however
    deep the towers are. Decoding only (no gradient): the region does not take the in-place writes of a training
    graph, and eager calls are unchanged. A block with sharded (DTensor) weights, under tensor or expert parallelism,
    is traced inline: the region does not take tensor subclasses."""
    region = torch.compiler.nested_compile_region(forward)

    @functools.wraps(forward)
    def dispatch(self, *args, **kwargs):
        inline = torch.is_grad_enabled() or (torch.compiler.is_compiling() and holds_sharded_weights(self))
        return forward(self, *args, **kwargs) if inline else region(self, *args, **kwargs)

    return dispatch


class TwoTowerBlock(NemotronHBlock):
    """A Nemotron-H block (pre-norm residual) whose mixer comes from `mixer_types`, its tower's table."""

    mixer_types = MIXER_TYPES
    forward = compiled_once_per_kind(NemotronHBlock.forward)

    def __init__(self, config: TwoTowerConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.block_type = config.layers_block_type[layer_idx]
        self.mixer = self.mixer_types[self.block_type](config, layer_idx=layer_idx)


__all__ = ["RECORD_NOTHING", "TwoTowerBlock", "TwoTowerMamba2Mixer", "TwoTowerPreTrainedModel", "block_start_states"]
