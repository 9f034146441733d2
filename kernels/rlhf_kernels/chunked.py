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
    """Block of logits alive at once: token_chunk x vocab_chunk fp32 (2 MiB by default; the GEMMs
    stay large enough to run near peak on a CPU)."""

    token_chunk: int = 512
    vocab_chunk: int = 1024


def block_logits(x: torch.Tensor, w: torch.Tensor, inv_temp: float, softcap: float = 0.0) -> torch.Tensor:
    """(n, H) x (v, H) -> (n, v) fp32 logits / T (low-precision inputs are upcast first); with ``softcap``,
    cap * tanh(logits / cap) / T (Gemma 2's final logit softcapping)."""
    z = torch.matmul(x.float(), w.float().T)
    if softcap:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z if inv_temp == 1.0 else z.mul_(inv_temp)


class ChunkedImpl:
    """Forward state sweep and backward logit-gradient blocks in plain torch."""

    name = "chunked"

    def __init__(self, chunks: ChunkSizes = ChunkSizes()) -> None:
        self.chunks = chunks

    def forward_state(self, xp, wp, xq, wq, y_local, inv_temp, softcap: float = 0.0) -> torch.Tensor:
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
                    u = block_logits(xq[n0 : n0 + tc], wq[v0:v1], inv_temp, softcap)  # (n, v)
                    mq = torch.maximum(st[:, MQ], u.amax(dim=1))
                    st[:, SQ] = st[:, SQ] * torch.exp(st[:, MQ] - mq) + torch.sub(u, mq[:, None]).exp_().sum(1)
                    st[:, MQ] = mq
                    st[:, UY] += torch.where(in_block, u.gather(1, col)[:, 0], 0.0)
                if xp is not None:
                    z = block_logits(xp[n0 : n0 + tc], wp[v0:v1], inv_temp, softcap)  # (n, v)
                    st[:, ZY] += torch.where(in_block, z.gather(1, col)[:, 0], 0.0)
                    m = torch.maximum(st[:, M], z.amax(dim=1))
                    scale = torch.exp(st[:, M] - m)  # 0 on the first block
                    e = torch.sub(z, m[:, None]).exp_()  # (n, v)
                    st[:, S] = st[:, S] * scale + e.sum(1)
                    st[:, A] = st[:, A] * scale + torch.linalg.vecdot(e, z)  # sum e*z without an (n, v) temporary
                    if u is not None:
                        st[:, C] = st[:, C] * scale + torch.linalg.vecdot(e, u)
                    st[:, M] = m
        return state

    def dlogits(self, xp, wp, xq, wq, y_local, zp, coef, inv_temp, n0, n1, v0, v1, need_u, out_dtype,
                softcap: float = 0.0):
        """d loss / d raw logits for the block [n0:n1, v0:v1]: dz / T, with dz from ``dz_coefficients``
        (times 1 - tanh^2 through a softcap)."""
        z = block_logits(xp[n0:n1], wp[v0:v1], inv_temp, softcap)  # (n, v)
        through_cap = 1.0 - (z / (softcap * inv_temp)).square_() if softcap else None  # (n, v) d capped / d raw
        g_lp, a, b, c = coef[n0:n1].unbind(dim=1)  # (n,) each
        if need_u or bool(b.any()):  # entropy or KL gradients: A + B z + C u
            inner = torch.addcmul(a[:, None], b[:, None], z)
            if need_u:
                inner.addcmul_(c[:, None], block_logits(xq[n0:n1], wq[v0:v1], inv_temp, softcap))
            dz = z.sub_(zp[n0:n1, None]).exp_().mul_(inner)  # p * inner, in z's storage
        else:  # log-prob gradient only: p * A
            dz = z.sub_(zp[n0:n1, None]).exp_().mul_(a[:, None])
        y = y_local[n0:n1]
        rows = torch.nonzero((y >= v0) & (y < v1))[:, 0]
        dz[rows, y[rows] - v0] += g_lp[rows]
        if through_cap is not None:
            dz.mul_(through_cap)
        return dz.mul_(inv_temp).to(out_dtype)

    def backward_chunks(self, N: int, V: int) -> tuple[int, int]:
        return self.chunks.token_chunk, self.chunks.vocab_chunk

    @staticmethod
    def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # CPU GEMMs in fp32 whatever the storage dtype
