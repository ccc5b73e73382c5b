"""Decoding: the one inference path of both towers (docs/architecture.md, "Decoding").

- The state is `context_twotower.TwoTowerDecodeState`: fixed buffers for everything the towers read and write, the
  `past_key_values` the context tower's own forward (Nemotron-H's) writes into.
- `context_step` appends tokens to it (the prompt, a committed block, one AR token) and returns the next-token logits;
  `denoise_step` runs the denoiser over a noisy block after it and returns the block's logits. Both build their masks
  with `visible_keys`, and neither syncs with the host, branches on a tensor's value or changes a shape between steps,
  so each compiles with `fullgraph=True` and, on CUDA, replays as one CUDA graph (Mock-AR's one-token step copies
  the Mamba states behind first, outside the graph: `DecodeSteps.extend`).
- `DecodeSteps` is the two steps, eager or compiled (each layer kind's block traced once:
  `backbone_twotower.compiled_once_per_kind`); `StatePool` keeps a model's compiled steps and states; `Decoder` is
  what generation calls: one prefilled state, the batch rows it holds, and finished rows dropped at block boundaries.

Eager and compiled decoding run these same functions; prefill is `context_step` on an empty state, uncompiled.
"""

import functools
import threading
import types
import weakref

import torch
from transformers import CompileConfig

from .backbone_twotower import RECORD_NOTHING
from .context_twotower import DenoiserContext, TwoTowerDecodeState, additive_mask, decode_placement


def visible_keys(
    key_real: torch.Tensor, query_positions: torch.Tensor, block_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """The one attention mask of decoding, additive `(B, 1, L, width)`: a query at context position `p` sees the real
    context keys `<= p`. Context queries (no `block_length`) also see themselves, so that a left-padding query is not
    all masked; the denoiser's queries also see the last `block_length` keys, their block.

    key_real (B, width) bool; query_positions (L,) long."""
    key_positions = torch.arange(key_real.shape[1], device=key_real.device)
    visible = key_real[:, None, :] & (key_positions <= query_positions[:, None])  # (B, L, width)
    if block_length:
        visible = visible | (key_positions >= key_real.shape[1] - block_length)
    else:
        visible = visible | (key_positions == query_positions[:, None])
    return additive_mask(visible[:, None], dtype)


def context_step(
    model, state: TwoTowerDecodeState, token_ids: torch.LongTensor, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Append tokens `(B, L)` to the state (the prompt, with `token_mask` 0 at its left padding; a committed block; one
    AR token) through the context tower's forward, and return the next-token logits after them, `(B, V)` fp32.

    The logits are computed even where nothing reads them (extensions in mask diffusion and Mock-AR): a graph that
    returns nothing but its in-place writes was miscompiled by inductor (wrong tokens on the fixture; torch 2.13)."""
    length = token_ids.shape[1]
    positions = state.length + torch.arange(length, device=state.length.device)  # (L,)
    real = token_mask.bool() if token_mask is not None else torch.ones_like(token_ids, dtype=torch.bool)
    state.key_real.index_copy_(1, positions, real.to(state.key_real.device))
    masks = {
        "full_attention": visible_keys(state.key_real, positions, 0, state.dtype),
        "linear_attention": token_mask,  # zeroes left padding in the scans
    }
    tower = model.context_tower
    hidden = tower(
        input_ids=token_ids,
        attention_mask=masks,
        past_key_values=state,
        position_ids=positions[None],
        **RECORD_NOTHING,
    ).last_hidden_state
    state.length.add_(length)
    return tower.next_token_logits(hidden[:, -1])


def denoiser_context(state: TwoTowerDecodeState, block_length: int, behind: bool) -> DenoiserContext:
    """The denoiser's view of the state for one block of `block_length` tokens per row: the context K/V where the
    context tower wrote them (one token behind with `behind`), the block's K/V written at the last `block_length`
    positions, the Mamba states its scans start from."""
    width = state.key_real.shape[1]
    last_seen = (state.length - 1 - int(behind)).reshape(1).expand(block_length)  # every block query sees this far
    conv, ssm = (state.conv_behind, state.ssm_behind) if behind else (state.conv, state.ssm)
    return DenoiserContext(
        keys=state.keys,
        values=state.values,
        conv_history={i: c[..., 1:] for i, c in conv.items()},
        ssm_states=ssm,
        attention_mask=visible_keys(state.key_real, last_seen, block_length, state.dtype),
        block_positions=torch.arange(width - block_length, width, device=state.length.device),
    )


def denoise_step(
    model, state: TwoTowerDecodeState, block_ids: torch.LongTensor, t: torch.Tensor | None, behind: bool
) -> torch.Tensor:
    """The denoiser's fp32 logits `(B, L, V)` for a noisy block `(B, L)`, `L <= block_size`, after the state's context
    (one token behind with `behind`: Mock-AR). Nothing of the context is written."""
    context = denoiser_context(state, block_ids.shape[1], behind)
    hidden = model.denoiser_tower(block_ids, context, t, **RECORD_NOTHING).last_hidden_state
    return model.lm_head(hidden).float()


# Graphs one compiled step may hold: one per batch size the state takes (a power of two when rows finish) and token
# count (an AR token, a block), for one model. Dynamo's default (8) would fall back to eager past it.
GRAPHS_PER_STEP = 64


def compiled_for_one_model(function, options: dict):
    """`torch.compile(function)` on a copy with a code object of its own: dynamo caches graphs per code object, so each
    model's steps count only their own graphs against the recompile limit (`GRAPHS_PER_STEP`, raised for the call)."""
    code = function.__code__.replace()  # a new code object: a cache of its own
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__)
    step = torch.compile(copy, **options)

    @functools.wraps(function)
    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=GRAPHS_PER_STEP):
            return step(*args)

    return call


class DecodeSteps:
    """The two decoding steps, as plain functions (eager) or compiled with `fullgraph=True`. Compiled functions are
    kept beside the model per compile config (`StatePool.compiled_steps`), so that later calls with the same shapes
    replay what was compiled."""

    def __init__(self, model, compile_config: CompileConfig | None = None):
        self.model, self.compiled = model, compile_config is not None
        self.context_function, self.denoise_function = context_step, denoise_step
        if compile_config is not None:
            functions = StatePool.of(model).compiled_steps
            key = repr(sorted(compile_config.to_dict().items()))
            if key not in functions:
                options = {**compile_config.to_dict(), "fullgraph": True}
                functions[key] = (compiled_for_one_model(context_step, options),
                                  compiled_for_one_model(denoise_step, options))  # fmt: skip
            self.context_function, self.denoise_function = functions[key]

    def extend(
        self,
        state: TwoTowerDecodeState,
        token_ids: torch.LongTensor,
        keep_behind: bool = False,
        token_mask: torch.Tensor | None = None,
        what: str = "An extension",
    ) -> torch.Tensor:
        """Append tokens to the state (`token_mask`: 0 at left padding, a prompt's) and return the next-token logits.
        The Mamba states behind are kept only where they can be read: a state that keeps them, one token."""
        length = token_ids.shape[1]
        state.check_room(length, what)
        keep_behind = keep_behind and state.keep_behind and length == 1
        if keep_behind:
            # Outside the compiled step: a graph that reads a Mamba state before the block region writes it in place
            # dropped that write under inductor (Mock-AR's tokens went wrong; torch 2.13, `nested_compile_region`).
            state.keep_states_behind()
        # A column sliced from the growing sequences has a stride that changes every step; graphs key on strides.
        logits = self.context_function(self.model, state, token_ids.contiguous(), token_mask)
        state.written(length, logits, keep_behind)
        return logits

    def denoise(self, state: TwoTowerDecodeState, block_ids: torch.LongTensor, t, behind: bool = False):
        if block_ids.shape[1] > state.block_size:
            raise ValueError(f"A block of {block_ids.shape[1]} tokens exceeds the state's {state.block_size}.")
        return self.denoise_function(self.model, state, block_ids.contiguous(), t, behind)


class StatePool:
    """What compiled decoding keeps for a model: its compiled steps per compile config, and decode states, so that a
    later call with the same shapes replays its CUDA graphs on the same addresses. A call takes a state out and gives
    it back when it ends: two calls never share one. At most `capacity` states are kept. The pool lives beside the
    model (a weak mapping), not in its `__dict__`: locks and compiled functions neither copy nor pickle."""

    capacity = 4

    def __init__(self):
        self.lock, self.free = threading.Lock(), []
        self.compiled_call = threading.Lock()  # held by the one compiled call running on the model
        self.compiled_steps: dict[str, tuple] = {}

    @staticmethod
    def of(model) -> "StatePool":
        with _POOLS_LOCK:
            return _POOLS.setdefault(model, StatePool())

    def clear(self):
        """Free the states kept (their memory returns to the allocator; the next compiled call allocates anew)."""
        with self.lock:
            self.free = []

    def take(self, model, batch_size, max_length, block_size, keep_behind, device) -> TwoTowerDecodeState:
        key = (batch_size, max_length, block_size, keep_behind, torch.device(device), decode_placement(model, device))
        with self.lock:
            for k, state in enumerate(self.free):
                if state.shape_key == key:
                    return self.free.pop(k).reset()
        return TwoTowerDecodeState(model, batch_size, max_length, block_size, keep_behind, device)

    def give_back(self, state: TwoTowerDecodeState):
        with self.lock:
            self.free = [state, *self.free][: self.capacity]


_POOLS: "weakref.WeakKeyDictionary[torch.nn.Module, StatePool]" = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


def power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Decoder:
    """What generation decodes from: the prefilled state of a batch, the two steps, and which batch rows the state
    holds. Finished rows leave at block boundaries (`keep_rows`), so neither tower computes for them again: eager, the
    state shrinks to the live rows; compiled, to the next power of two of them (a few batch sizes, each compiled once),
    the remaining places holding finished rows. Outputs are always for the whole batch; rows not held get 0."""

    def __init__(self, model, input_ids, attention_mask, new_tokens, block_size, keep_behind, compile_config=None):
        self.model, self.batch_size = model, input_ids.shape[0]
        self.steps = model.decode_steps(compile_config)
        self.pool, self.lock = None, None
        if self.steps.compiled:
            self.pool = StatePool.of(model)
            self.lock = self.pool.compiled_call
            if not self.lock.acquire(blocking=False):
                raise RuntimeError(
                    "Another `generate(compile=True)` is running on this model: its compiled steps (and their CUDA "
                    "graphs) are not shared between concurrent calls. Wait for it, or generate eagerly (states are "
                    "then per call)."
                )
        self.state = None
        try:
            max_length = TwoTowerDecodeState.length_for(input_ids.shape[1], new_tokens, block_size)
            self.state = self._new_state(self.batch_size, max_length, block_size, keep_behind, input_ids.device)
            model.prefill(input_ids, attention_mask, keep_behind=keep_behind, state=self.state)
        except BaseException:
            self.__exit__()
            raise
        self.rows = torch.arange(self.batch_size, device=input_ids.device)  # the batch row of every state row
        self.held = list(range(self.batch_size))  # the same on the host

    def _new_state(self, batch_size, max_length, block_size, keep_behind, device):
        if self.pool is not None:
            return self.pool.take(self.model, batch_size, max_length, block_size, keep_behind, device)
        return self.model.new_decode_state(batch_size, max_length, block_size, keep_behind, device)

    @property
    def holds_every_row(self) -> bool:
        return len(self.held) == self.batch_size  # (the state shrinks, never permutes a full batch)

    def _whole_batch(self, held: torch.Tensor) -> torch.Tensor:
        if self.holds_every_row:
            return held
        full = held.new_zeros(self.batch_size, *held.shape[1:])
        full[self.rows.to(full.device)] = held
        return full

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self._whole_batch(self.state.next_token_logits)

    def denoise(self, block: torch.LongTensor, t: torch.Tensor | None, behind: bool = False) -> torch.Tensor:
        if not self.holds_every_row:
            block, t = block[self.rows], None if t is None else t[self.rows]
        return self._whole_batch(self.steps.denoise(self.state, block, t, behind))

    def extend(self, tokens: torch.LongTensor, keep_behind: bool = False):
        self.steps.extend(self.state, tokens if self.holds_every_row else tokens[self.rows], keep_behind)

    def keep_rows(self, finished: list[bool]):
        """Drop finished rows (`finished`: per batch row, on the host) when the state can shrink."""
        live = [row for row in self.held if not finished[row]]
        size = power_of_two_at_least(len(live)) if self.steps.compiled else len(live)
        if not live or size >= len(self.held):
            return
        filler = [row for row in self.held if finished[row]][: size - len(live)]
        held = live + filler
        places = torch.tensor([self.held.index(row) for row in held], device=self.rows.device)
        old = self.state
        new = self._new_state(size, old.max_length, old.block_size, old.keep_behind, old.device)
        try:
            new.copy_rows_from(old, places)
        except BaseException:
            self.close(new)
            raise
        self.state = new
        self.close(old)
        self.held, self.rows = held, torch.tensor(held, device=self.rows.device)

    def close(self, state: TwoTowerDecodeState | None = None):
        """Give a state back to the pool (compiled decoding; eager states are freed): `state`, or the decoder's own,
        which it then no longer holds."""
        if state is None:
            state, self.state = self.state, None
        if self.pool is not None and state is not None:
            self.pool.give_back(state)

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc):
        self.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


__all__ = [
    "DecodeSteps",
    "Decoder",
    "StatePool",
    "TwoTowerDecodeState",
    "context_step",
    "denoise_step",
    "denoiser_context",
    "visible_keys",
]
