"""Triton kernels for the fused LM head: forward state sweep and backward logit-gradient blocks.

Forward (``_state_fwd_kernel``): a program owns BLOCK_N tokens and one slice of the vocabulary. For each
BLOCK_V tile it computes the logit tile z = X W^T / T with tl.dot over BLOCK_H-wide steps of the hidden
dimension (fp32 accumulation), and folds it into the 8-number online state of ``state``; the reference
tile u likewise. Logits never leave registers. Slices (grid axis 1) let short batches fill the GPU;
their states merge on the host exactly like tensor-parallel shards.

Backward (``_dlogits_kernel``): recomputes z (and u only when the KL gradient is non-zero) for a
(token chunk x vocabulary chunk) block and writes dz / T with the closed form of
``state.dz_coefficients`` into a bounded workspace. The host then forms dW_chunk = dZ^T X (each slice
written once) and dX += dZ W_chunk with ordinary GEMMs: no atomics, deterministic.

Runs on Triton 3.6 through 3.9: pointer arithmetic only (no block pointers), int64 offsets, fp32
arithmetic after loads, no libdevice calls. Under TRITON_INTERPRET=1 it runs (slowly) on the CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .state import STATE_WIDTH


@triton.jit
def _tile_logits(
    x_ptr,  # [N, H]
    w_ptr,  # [V, H]
    rn,  # [BLOCK_N] token rows (int64)
    rv,  # [BLOCK_V] vocabulary rows (int64)
    n_ok,
    v_ok,
    H,
    stride_x,
    stride_w,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 tile of x @ w^T / T."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_ok = rh < H
        x = tl.load(x_ptr + rn[:, None] * stride_x + rh[None, :], mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rv[:, None] * stride_w + rh[None, :], mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _state_fwd_kernel(
    xp_ptr,  # [N, H] policy hidden
    wp_ptr,  # [V, H] policy LM-head shard
    xq_ptr,  # [N, H] reference hidden
    wq_ptr,  # [V, H] reference LM-head shard
    y_ptr,  # [N] int64 target index in this shard, -1 elsewhere
    state_ptr,  # [SPLITS, N, 8] fp32 out
    N,
    V,
    H,
    v_per_split,
    stride_xp,
    stride_wp,
    stride_xq,
    stride_wq,
    inv_temp,
    HAS_POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < N
    y = tl.load(y_ptr + rn, mask=n_ok, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    neg_inf = float("-inf")
    m = tl.full([BLOCK_N], neg_inf, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    c = tl.zeros([BLOCK_N], tl.float32)
    mq = tl.full([BLOCK_N], neg_inf, tl.float32)
    sq = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    uy = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = rv < v_hi
        hit = rv[None, :] == y[:, None]  # [BLOCK_N, BLOCK_V]
        if HAS_REF:
            u = _tile_logits(xq_ptr, wq_ptr, rn, rv, n_ok, v_ok, H, stride_xq, stride_wq, inv_temp,
                             BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
            uy += tl.sum(tl.where(hit, u, 0.0), axis=1)
            u_masked = tl.where(v_ok[None, :], u, neg_inf)
            mq_new = tl.maximum(mq, tl.max(u_masked, axis=1))
            sq = sq * tl.exp(mq - mq_new) + tl.sum(tl.exp(u_masked - mq_new[:, None]), axis=1)
            mq = mq_new
        if HAS_POLICY:
            z = _tile_logits(xp_ptr, wp_ptr, rn, rv, n_ok, v_ok, H, stride_xp, stride_wp, inv_temp,
                             BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
            zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
            z_masked = tl.where(v_ok[None, :], z, neg_inf)
            m_new = tl.maximum(m, tl.max(z_masked, axis=1))
            scale = tl.exp(m - m_new)
            e = tl.exp(z_masked - m_new[:, None])  # 0 outside the slice
            s = s * scale + tl.sum(e, axis=1)
            a = a * scale + tl.sum(tl.where(v_ok[None, :], e * z, 0.0), axis=1)
            if HAS_REF:
                c = c * scale + tl.sum(tl.where(v_ok[None, :], e * u, 0.0), axis=1)
            m = m_new
    out = state_ptr + pid_s * N * 8 + rn * 8
    tl.store(out + 0, m, mask=n_ok)
    tl.store(out + 1, s, mask=n_ok)
    tl.store(out + 2, a, mask=n_ok)
    tl.store(out + 3, c, mask=n_ok)
    tl.store(out + 4, mq, mask=n_ok)
    tl.store(out + 5, sq, mask=n_ok)
    tl.store(out + 6, zy, mask=n_ok)
    tl.store(out + 7, uy, mask=n_ok)


@triton.jit
def _dlogits_kernel(
    xp_ptr,  # [N, H]
    wp_ptr,  # [V, H]
    xq_ptr,  # [N, H]
    wq_ptr,  # [V, H]
    y_ptr,  # [N] int64 local target or -1
    zp_ptr,  # [N] fp32 log-partition Z_p
    coef_ptr,  # [N, 4] fp32 (g_lp, A, B, C)
    dz_ptr,  # [n1 - n0, v1 - v0] out, workspace block
    n0,
    n1,
    v0,
    v1,
    H,
    stride_xp,
    stride_wp,
    stride_xq,
    stride_wq,
    stride_dz,
    inv_temp,
    NEED_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rn = (n0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rv = (v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_ok = rn < n1
    v_ok = rv < v1
    z = _tile_logits(xp_ptr, wp_ptr, rn, rv, n_ok, v_ok, H, stride_xp, stride_wp, inv_temp,
                     BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    zp = tl.load(zp_ptr + rn, mask=n_ok, other=0.0)
    g_lp = tl.load(coef_ptr + rn * 4 + 0, mask=n_ok, other=0.0)
    ca = tl.load(coef_ptr + rn * 4 + 1, mask=n_ok, other=0.0)
    cb = tl.load(coef_ptr + rn * 4 + 2, mask=n_ok, other=0.0)
    inner = ca[:, None] + cb[:, None] * z
    if NEED_U:
        cc = tl.load(coef_ptr + rn * 4 + 3, mask=n_ok, other=0.0)
        u = _tile_logits(xq_ptr, wq_ptr, rn, rv, n_ok, v_ok, H, stride_xq, stride_wq, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        inner += cc[:, None] * u
    y = tl.load(y_ptr + rn, mask=n_ok, other=-1)
    dz = tl.exp(z - zp[:, None]) * inner + tl.where(rv[None, :] == y[:, None], g_lp[:, None], 0.0)
    out = dz_ptr + (rn - n0)[:, None] * stride_dz + (rv - v0)[None, :]
    tl.store(out, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonImpl:
    """Launchers for the kernels above, with the same interface as ``chunked.ChunkedImpl``."""

    name = "triton"

    def __init__(self, num_splits: int | None = None, block_n: int | None = None, block_v: int | None = None,
                 block_h: int | None = None, workspace_bytes: int = 512 * 2**20) -> None:
        interp = _interpreting()
        # GPU tiles sized for H100-class SMs; small tiles keep the CPU interpreter quick.
        self.block_n = block_n or (16 if interp else 128)
        self.block_v = block_v or (32 if interp else 128)
        self.block_h = block_h or (16 if interp else 64)
        self.num_splits = num_splits
        self.workspace_bytes = workspace_bytes
        self.launch = {} if interp else {"num_warps": 8, "num_stages": 3}

    @staticmethod
    def _precision(x: torch.Tensor) -> str:
        return "ieee" if x.dtype == torch.float32 else "tf32"  # only fp32 operands read this

    def _splits(self, N: int, V: int, device: torch.device) -> int:
        if self.num_splits is not None:
            return max(1, min(self.num_splits, triton.cdiv(V, self.block_v)))
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n_blocks = triton.cdiv(N, self.block_n)
        return max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(V, 8 * self.block_v)))

    def forward_state(self, xp, wp, xq, wq, y_local, inv_temp) -> torch.Tensor:
        x_any = xp if xp is not None else xq
        w_any = wp if wp is not None else wq
        N, H = x_any.shape
        V = w_any.shape[0]
        splits = self._splits(N, V, x_any.device)
        v_per_split = triton.cdiv(triton.cdiv(V, splits), self.block_v) * self.block_v
        splits = triton.cdiv(V, v_per_split)
        state = torch.empty(splits, N, STATE_WIDTH, dtype=torch.float32, device=x_any.device)
        xp_, wp_ = (xp, wp) if xp is not None else (xq, wq)  # dummies when the policy half is off
        xq_, wq_ = (xq, wq) if xq is not None else (xp, wp)
        grid = (triton.cdiv(N, self.block_n), splits)
        _state_fwd_kernel[grid](
            xp_, wp_, xq_, wq_, y_local, state, N, V, H, v_per_split,
            xp_.stride(0), wp_.stride(0), xq_.stride(0), wq_.stride(0), inv_temp,
            HAS_POLICY=xp is not None, HAS_REF=xq is not None,
            BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h,
            PRECISION=self._precision(x_any), **self.launch,
        )
        if splits == 1:
            return state[0]
        from .state import merge

        return merge(state)

    def dlogits(self, xp, wp, xq, wq, y_local, zp, coef, inv_temp, n0, n1, v0, v1, need_u, out_dtype):
        dz = torch.empty(n1 - n0, v1 - v0, dtype=out_dtype, device=xp.device)
        xq_, wq_ = (xq, wq) if need_u else (xp, wp)
        grid = (triton.cdiv(n1 - n0, self.block_n), triton.cdiv(v1 - v0, self.block_v))
        _dlogits_kernel[grid](
            xp, wp, xq_, wq_, y_local, zp, coef, dz, n0, n1, v0, v1, xp.shape[1],
            xp.stride(0), wp.stride(0), xq_.stride(0), wq_.stride(0), dz.stride(0), inv_temp,
            NEED_U=need_u, BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h,
            PRECISION=self._precision(xp), **self.launch,
        )
        return dz

    @staticmethod
    def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype  # tensor-core GEMMs on the storage dtype, fp32 accumulation

    def backward_chunks(self, N: int, V: int) -> tuple[int, int]:
        """All tokens at once (each dW slice written once) and as many vocabulary rows as the
        workspace allows; token chunks only when a single vocabulary tile would not fit."""
        per_elem = 4
        vocab_chunk = max(self.block_v, (self.workspace_bytes // (per_elem * max(N, 1))) // self.block_v * self.block_v)
        token_chunk = N if vocab_chunk * N * per_elem <= self.workspace_bytes else max(
            self.block_n, self.workspace_bytes // (per_elem * vocab_chunk))
        return token_chunk, min(vocab_chunk, V)
