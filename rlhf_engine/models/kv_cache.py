"""The KV cache of incremental decoding (``rollout.sampling.generate``): preallocated keys and values per
layer, the document id of every slot, and the fill level, eager or static (``rollout.decode_mode``)."""

from __future__ import annotations

import torch

from ..config.model import TransformerConfig


class KVCache:
    """Preallocated keys/values for incremental decoding, (L, B, kvh, max_len, d) each.

    Slot t holds the t-th token fed to the model. ``document_ids`` per slot separate left padding
    (give pads their own id, e.g. -1) from the text; the model's causal-and-same-document mask does
    the rest, so a left-padded batch decodes like each row alone.

    ``static=True``: every decode step has the same shapes and reads no host value, as CUDA graphs and
    ``torch.compile`` need. The fill level is a device tensor (``filled``), keys and values are written
    with ``index_copy_`` at tensor slots, and attention reads all ``max_len`` slots, those not written yet
    hidden by the causal mask (they lie after the query). The same values up to the order of the
    attention's reductions over a longer key axis; overflow is not checked (no host read).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        num_kv_heads: int | None = None,
        static: bool = False,
    ) -> None:
        kvh = num_kv_heads or cfg.num_kv_heads  # a tensor-parallel shard holds fewer heads
        shape = (batch_size, kvh, max_len, cfg.head_dim)
        # one tensor per layer, not views of one (L, ...) tensor: torch.compile then writes a static cache in
        # place (a write through a view of a graph input is compiled as a copy of the whole base tensor)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.static = static
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # static: slots filled, on the device
        self.length = 0  # dynamic: slots filled by completed forwards
        self._pending = 0  # tokens of the forward in progress
        self._slots: torch.Tensor | None = None  # static: the slots of the forward in progress

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def begin(self, document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for (B, S) new tokens; returns (query slots (S,), key document ids (B, Sk))."""
        S = document_ids.shape[1]
        if self.static:
            self._slots = self.filled + torch.arange(S, device=document_ids.device)  # (S,)
            self.document_ids.index_copy_(1, self._slots, document_ids)
            return self._slots, self.document_ids
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        self.document_ids[:, self.length : end] = document_ids
        self._pending = S
        q_slots = torch.arange(self.length, end, device=document_ids.device)
        return q_slots, self.document_ids[:, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's (B, kvh, S, d) keys/values of ``layer``; return all (B, kvh, Sk, d)."""
        if self.static:
            self.k[layer].index_copy_(2, self._slots, k)
            self.v[layer].index_copy_(2, self._slots, v)
            return self.k[layer], self.v[layer]
        start, S = self.length, k.shape[2]
        keys, values = self.k[layer], self.v[layer]  # (B, kvh, max_len, d)
        keys.narrow(2, start, S).copy_(k)
        values.narrow(2, start, S).copy_(v)
        return keys.narrow(2, 0, start + S), values.narrow(2, 0, start + S)

    def commit(self) -> None:
        if self.static:
            self.filled.add_(self._slots.shape[0])
            return
        self.length += self._pending
        self._pending = 0
