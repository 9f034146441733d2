"""Chunked torch implementation of the fused LM-head math: the CPU path and the fallback anywhere.

Logits exist only one (token chunk x vocabulary chunk) block at a time, in fp32, so the working set is
bounded by ``token_chunk * vocab_chunk`` whatever N and V are. Same state algebra and closed-form
backward as the Triton kernels (see ``state``), so the two are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import A, C, M, MQ, S, SQ, STATE_WIDTH, UY, ZY


@dataclass(frozen=True)
class ChunkSizes:
    token_chunk: int = 1024
    vocab_chunk: int = 4096


def block_logits(x: torch.Tensor, w: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """(n, H) x (v, H) -> (n, v) fp32 logits / T (low-precision inputs are upcast first)."""
    return torch.matmul(x.float(), w.float().T) * inv_temp


class ChunkedImpl:
    """Forward state sweep and backward logit-gradient blocks in plain torch."""

    name = "chunked"

    def __init__(self, chunks: ChunkSizes = ChunkSizes()) -> None:
        self.chunks = chunks

    def forward_state(self, xp, wp, xq, wq, y_local, inv_temp) -> torch.Tensor:
        """(N, 8) state of this rank's vocabulary slice; y_local is -1 where the target is elsewhere."""
        x_any = xp if xp is not None else xq
        N, V = x_any.shape[0], (wp if wp is not None else wq).shape[0]
        state = torch.zeros(N, STATE_WIDTH, dtype=torch.float32, device=x_any.device)
        state[:, M] = state[:, MQ] = float("-inf")
        tc, vc = self.chunks.token_chunk, self.chunks.vocab_chunk
        for n0 in range(0, N, tc):
            st = state[n0 : n0 + tc]  # (n, 8) view
            y = y_local[n0 : n0 + tc]
            for v0 in range(0, V, vc):
                v1 = min(v0 + vc, V)
                in_block = (y >= v0) & (y < v1)  # (n,)
                col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
                u = None
                if xq is not None:
                    u = block_logits(xq[n0 : n0 + tc], wq[v0:v1], inv_temp)  # (n, v)
                    mq = torch.maximum(st[:, MQ], u.amax(dim=1))
                    st[:, SQ] = st[:, SQ] * torch.exp(st[:, MQ] - mq) + torch.exp(u - mq[:, None]).sum(1)
                    st[:, MQ] = mq
                    st[:, UY] += torch.where(in_block, u.gather(1, col)[:, 0], 0.0)
                if xp is not None:
                    z = block_logits(xp[n0 : n0 + tc], wp[v0:v1], inv_temp)  # (n, v)
                    m = torch.maximum(st[:, M], z.amax(dim=1))
                    scale = torch.exp(st[:, M] - m)  # 0 on the first block
                    e = torch.exp(z - m[:, None])  # (n, v)
                    st[:, S] = st[:, S] * scale + e.sum(1)
                    st[:, A] = st[:, A] * scale + (e * z).sum(1)
                    if u is not None:
                        st[:, C] = st[:, C] * scale + (e * u).sum(1)
                    st[:, M] = m
                    st[:, ZY] += torch.where(in_block, z.gather(1, col)[:, 0], 0.0)
        return state

    def dlogits(self, xp, wp, xq, wq, y_local, zp, coef, inv_temp, n0, n1, v0, v1, need_u, out_dtype):
        """d loss / d raw logits for the block [n0:n1, v0:v1]: dz / T, with dz from ``dz_coefficients``."""
        z = block_logits(xp[n0:n1], wp[v0:v1], inv_temp)  # (n, v)
        g_lp, a, b, c = coef[n0:n1].unbind(dim=1)  # (n,) each
        inner = a[:, None] + b[:, None] * z
        if need_u:
            inner += c[:, None] * block_logits(xq[n0:n1], wq[v0:v1], inv_temp)
        dz = torch.exp(z - zp[n0:n1, None]) * inner  # (n, v)
        y = y_local[n0:n1]
        hit = (y >= v0) & (y < v1)
        rows = torch.nonzero(hit)[:, 0]
        dz[rows, y[rows] - v0] += g_lp[rows]
        return (dz * inv_temp).to(out_dtype)

    def backward_chunks(self, N: int, V: int) -> tuple[int, int]:
        return self.chunks.token_chunk, self.chunks.vocab_chunk

    @staticmethod
    def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # CPU GEMMs in fp32 whatever the storage dtype
