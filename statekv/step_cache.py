"""`StepCache`: the streaming prefill's transformers cache, preallocated once per video and updated in place.

gpt-fast's static KV cache is the model: per attention layer one buffer holds [prefix | carried state | step],
the model's `update` writes the step's keys and values after the state (no concatenation), the policy's next state
is written back at the state's place (nothing moves for `Full`, whose next state is [state | step] where it
already lies), and the step's own KV is copied off the device in one transfer. Before, every step built a new
`DynamicCache` by concatenating [prefix | state] per layer, and transformers concatenated the step onto it again.

Linear-attention layers (hybrid stacks, e.g. Qwen3.5's Gated DeltaNet) keep transformers' own cache layers, alive
from step to step: they update their convolution and recurrent states in place, exactly as in one long forward.

Boundary: buffers and the Cache API (transformers 5.x `Cache` / `CacheLayerMixin`); no policy, no family. The
buffers grow by doubling when `Full`'s state outgrows them (amortised: a long video copies its KV a few times,
not once per step).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from statekv.cache import RecurrentState
from statekv.policies import LayerState


class StepLayer(CacheLayerMixin):
    """One attention layer's [prefix | state | step] keys, values and token indices, written in place.

    The model sees `keys`/`values` (views of the filled part, (1, Hkv, P + S + n, D)); the engine reads the
    step's KV and hands the policy [state | step] as views (`merged`), then `commit`s the next state.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor], state: LayerState | None, *, reserve: int) -> None:
        super().__init__()
        pk, pv = prefix  # (1, Hkv, P, D)
        self.prefix_len = pk.shape[2]
        self.state_size = 0 if state is None else state.size
        self.length = self.prefix_len + self.state_size  # filled columns: prefix + state (+ step after update)
        capacity = self.length + reserve
        heads, dim, vdim = pk.shape[1], pk.shape[3], pv.shape[3]
        self._k = pk.new_empty(1, heads, capacity, dim)  # (1, Hkv, C, D)
        self._v = pv.new_empty(1, heads, capacity, vdim)
        self._tok = torch.empty(heads, capacity, dtype=torch.long, device=pk.device)  # (Hkv, C) video token index
        self._k[:, :, :self.prefix_len] = pk
        self._v[:, :, :self.prefix_len] = pv
        if state is not None:
            self._write_state(state)
        self.device = pk.device
        self.is_initialized = True
        self._refresh()

    # --- transformers' Cache layer API ------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (1, Hkv, n, D) after what is there; return views of everything so far."""
        n = key_states.shape[2]
        self._reserve(self.length + n)
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    # --- the engine's side ------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Forget the last step: the next `update` writes right after [prefix | state]."""
        self.length = self.prefix_len + self.state_size
        self._refresh()

    def step_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last step's own keys and values, views (Hkv, n, D): valid until `commit`."""
        lo = self.prefix_len + self.state_size
        return self._k[0, :, lo:self.length], self._v[0, :, lo:self.length]

    def merged(self, first_token: int) -> LayerState:
        """[state | step] as views of the buffers, the step's tokens numbered from `first_token` among the video's
        tokens (the state's own scores, if a policy keeps any, are the engine's to pass)."""
        lo, mid = self.prefix_len, self.prefix_len + self.state_size
        n = self.length - mid
        self._tok[:, mid:self.length] = torch.arange(first_token, first_token + n, device=self._tok.device)
        return LayerState(self._k[0, :, lo:self.length], self._v[0, :, lo:self.length], self._tok[:, lo:self.length])

    def commit(self, state: LayerState) -> None:
        """Make `state` the carried state: written at the state's place unless it already lies there."""
        self._write_state(state)
        self.length = self.prefix_len + self.state_size
        self._refresh()

    def state(self) -> LayerState:
        """The carried state as views of the buffers (scores are not kept here)."""
        lo, hi = self.prefix_len, self.prefix_len + self.state_size
        return LayerState(self._k[0, :, lo:hi], self._v[0, :, lo:hi], self._tok[:, lo:hi])

    # --- internals --------------------------------------------------------------------------------------------

    def _write_state(self, state: LayerState) -> None:
        lo, size = self.prefix_len, state.size
        self._reserve(lo + size)
        for buf, src in ((self._k[0], state.keys), (self._v[0], state.values), (self._tok, state.token_index)):
            dst = buf[:, lo:lo + size]
            if src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride():
                continue  # already in place (Full: [state | step] is the next state)
            if src.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
                src = src.clone()  # a view of this buffer elsewhere (Window's tail): the ranges may overlap
            dst.copy_(src)
        self.state_size = size

    def _reserve(self, columns: int) -> None:
        """Grow the buffers (doubling) so that they hold `columns` columns."""
        capacity = self._k.shape[2]
        if columns <= capacity:
            return
        capacity = max(columns, 2 * capacity)
        k = self._k.new_empty(*self._k.shape[:2], capacity, self._k.shape[3])
        v = self._v.new_empty(*self._v.shape[:2], capacity, self._v.shape[3])
        tok = self._tok.new_empty(self._tok.shape[0], capacity)
        k[:, :, :self.length] = self._k[:, :, :self.length]
        v[:, :, :self.length] = self._v[:, :, :self.length]
        tok[:, :self.length] = self._tok[:, :self.length]
        self._k, self._v, self._tok = k, v, tok
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._k[:, :, :self.length]  # (1, Hkv, length, D)
        self.values = self._v[:, :, :self.length]


class StepCache(DynamicCache):
    """The model's cache for a whole streaming prefill: `StepLayer`s at attention layers, transformers' own layers
    (states updated in place, carried across steps) at linear-attention layers."""

    def __init__(self, config: Any, prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | None],
                 states: list[LayerState | None], recurrent: dict[int, RecurrentState], *, reserve: int) -> None:
        super().__init__(config=config)
        if len(self.layers) != len(prefix_kv):
            raise ValueError(f"{len(prefix_kv)} layers given, the model config has {len(self.layers)}")
        for i, (kv, state) in enumerate(zip(prefix_kv, states)):
            if kv is not None:
                self.layers[i] = StepLayer(kv, state, reserve=reserve)
        for layer, rec in recurrent.items():
            self.update_conv_state(rec.conv.unsqueeze(0), layer)  # fresh layers: allocate and copy
            self.update_recurrent_state(rec.recurrent.unsqueeze(0), layer)
        self.attention = [i for i, kv in enumerate(prefix_kv) if kv is not None]

    def begin_step(self) -> None:
        for i in self.attention:
            self.layers[i].begin_step()

    def step_to_host(self) -> "HostKV":
        """The last step's keys and values per layer on the host, copied off the device in ONE transfer (pinned
        and non-blocking on CUDA: `HostKV.wait()` before reading them)."""
        kv = [t for i in self.attention for t in self.layers[i].step_kv()]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        if not kv:
            return HostKV(out, None)
        if any(t.shape != kv[0].shape for t in kv):  # layers of different widths: one transfer each
            staged = kv
        else:
            staged = torch.stack(kv)  # (2·layers, Hkv, n, D): the step's KV in one block, off the buffers
        event = None
        if kv[0].device.type == "cpu":
            host = staged if isinstance(staged, torch.Tensor) else [t.clone() for t in staged]  # the stack is the copy
        else:
            copies = [staged] if isinstance(staged, torch.Tensor) else staged
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in copies]
            for dst, src in zip(pinned, copies):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(kv[0].device))
            host = pinned[0] if isinstance(staged, torch.Tensor) else pinned
        for j, i in enumerate(self.attention):
            out[i] = (host[2 * j], host[2 * j + 1])
        return HostKV(out, event)


class HostKV:
    """A step's per-layer (keys, values) (Hkv, n, D) on the host (None at linear layers), possibly still arriving."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor] | None], event: Any) -> None:
        self._kv = kv
        self._event = event

    def wait(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The tensors, once the copy has landed."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._kv
