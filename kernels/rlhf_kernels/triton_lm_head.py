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

Register budget (what keeps these kernels spill-free, checked ahead of time by ``rlhf_kernels.aot``):
- GEMM operands are read through pointers advanced by BLOCK_H each step (the matmul-tutorial pattern),
  not rebuilt per step, and without masks when H is a multiple of BLOCK_H (``EVEN_H``).
- Rows past the end are clamped to the last valid row instead of masked: their results are never
  stored, and the loads stay unpredicated.
- Vocabulary ids compare as int32 (only addresses are int64); e * z needs no mask because e = 0
  past the slice and the clamped z is finite there.

Launch configurations come from ``launch`` (a table keyed by architecture); ``TritonImpl.plan_*``
turn them into a ``launch.KernelPlan``, which both the launch and the ahead-of-time compile use.

Runs on Triton 3.6 through 3.9: pointer arithmetic only (no block pointers), int64 offsets, fp32
arithmetic after loads, no libdevice calls. Under TRITON_INTERPRET=1 it runs (slowly) on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch as L
from .state import STATE_WIDTH, merge


@triton.jit
def _tile_logits(
    x_ptr,  # [N, H]
    w_ptr,  # [V, H]
    rows,  # [BLOCK_N] int64 token rows, already clamped to valid rows
    cols,  # [BLOCK_V] int64 vocabulary rows, already clamped to valid rows
    H,
    stride_x,
    stride_w,
    inv_temp,
    softcap,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 tile of x @ w^T / T, or of cap * tanh(x @ w^T / cap) / T with SOFTCAP."""
    rh = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None] * stride_x + rh[None, :]  # [BLOCK_N, BLOCK_H]
    w_ptrs = w_ptr + cols[None, :] * stride_w + rh[:, None]  # [BLOCK_H, BLOCK_V]: W^T read in place
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(h0 + rh)[None, :] < H, other=0.0)
            w = tl.load(w_ptrs, mask=(h0 + rh)[:, None] < H, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if SOFTCAP:  # tanh(t) = 2 sigmoid(2t) - 1
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
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
    v_per_split,  # a multiple of BLOCK_V: tiles never straddle two slices
    stride_xp,
    stride_wp,
    stride_xq,
    stride_wq,
    inv_temp,
    softcap,
    HAS_POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < N
    rows = tl.minimum(rn, N - 1)  # rows past N recompute row N-1; never stored
    y = tl.load(y_ptr + rn, mask=n_ok, other=-1).to(tl.int32)
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
        rv = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V] int32 vocabulary ids
        v_ok = rv < v_hi
        cols = tl.minimum(rv, V - 1).to(tl.int64)
        hit = rv[None, :] == y[:, None]  # [BLOCK_N, BLOCK_V]; y < v_hi whenever it is in this slice
        if HAS_REF:
            u = _tile_logits(xq_ptr, wq_ptr, rows, cols, H, stride_xq, stride_wq, inv_temp, softcap,
                             BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, SOFTCAP)
            uy += tl.sum(tl.where(hit, u, 0.0), axis=1)
            u_m = tl.where(v_ok[None, :], u, neg_inf)
            mq_new = tl.maximum(mq, tl.max(u_m, axis=1))
            sq = sq * tl.exp(mq - mq_new) + tl.sum(tl.exp(u_m - mq_new[:, None]), axis=1)
            mq = mq_new
        if HAS_POLICY:
            z = _tile_logits(xp_ptr, wp_ptr, rows, cols, H, stride_xp, stride_wp, inv_temp, softcap,
                             BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, SOFTCAP)
            zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
            z_m = tl.where(v_ok[None, :], z, neg_inf)
            m_new = tl.maximum(m, tl.max(z_m, axis=1))
            scale = tl.exp(m - m_new)
            e = tl.exp(z_m - m_new[:, None])  # 0 past the slice, where z itself is finite
            s = s * scale + tl.sum(e, axis=1)
            a = a * scale + tl.sum(e * z, axis=1)
            if HAS_REF:
                c = c * scale + tl.sum(e * u, axis=1)
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
    softcap,
    NEED_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    rn = (n0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rv = v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # int32 vocabulary ids
    n_ok = rn < n1
    v_ok = rv < v1
    rows = tl.minimum(rn, n1 - 1)
    cols = tl.minimum(rv, v1 - 1).to(tl.int64)
    z = _tile_logits(xp_ptr, wp_ptr, rows, cols, H, stride_xp, stride_wp, inv_temp, softcap,
                     BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, SOFTCAP)
    zp = tl.load(zp_ptr + rows)
    g_lp = tl.load(coef_ptr + rows * 4 + 0)
    ca = tl.load(coef_ptr + rows * 4 + 1)
    cb = tl.load(coef_ptr + rows * 4 + 2)
    inner = ca[:, None] + cb[:, None] * z
    if NEED_U:
        cc = tl.load(coef_ptr + rows * 4 + 3)
        u = _tile_logits(xq_ptr, wq_ptr, rows, cols, H, stride_xq, stride_wq, inv_temp, softcap,
                         BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, SOFTCAP)
        inner += cc[:, None] * u
    y = tl.load(y_ptr + rows).to(tl.int32)
    dz = tl.exp(z - zp[:, None]) * inner + tl.where(rv[None, :] == y[:, None], g_lp[:, None], 0.0)
    if SOFTCAP:  # through cap * tanh(r / cap): d/dr = 1 - tanh^2
        t = z / (softcap * inv_temp)
        dz = dz * (1.0 - t * t)
    out = dz_ptr + (rn - n0)[:, None] * stride_dz + (rv - v0)[None, :]
    tl.store(out, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


class TritonImpl:
    """Launchers for the kernels above, with the same interface as ``chunked.ChunkedImpl``.

    ``config`` overrides the table's launch configuration (tests, sweeps); ``num_splits`` the
    vocabulary-split rule; ``arch`` / ``sms`` the device's (for planning without a GPU).
    """

    name = "triton"

    def __init__(self, config: L.LaunchConfig | None = None, num_splits: int | None = None,
                 workspace_bytes: int = 512 * 2**20, arch: int | None = None, sms: int | None = None) -> None:
        self.config = config
        self.num_splits = num_splits
        self.workspace_bytes = workspace_bytes
        self.arch = arch
        self.sms = sms

    # ------------------------------------------------------------------------------------------ planning

    def _arch(self, device: torch.device | None) -> int | None:
        """Compute capability the launch is planned for; None under the interpreter."""
        if L.interpreting():
            return None
        return self.arch if self.arch is not None else L.device_capability(device)

    def _sms(self, device: torch.device | None, arch: int | None) -> int:
        if self.sms is not None:
            return self.sms
        if device is not None and device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return L.ARCHS[L.arch_family(arch)].sms if arch is not None else 1

    def _config(self, arch, kernel, gemms, dtype) -> L.LaunchConfig:
        return self.config or L.lm_head_config(arch, kernel, gemms, dtype)

    @staticmethod
    def _precision(dtype: torch.dtype) -> str:
        return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands read this

    def plan_forward(self, N: int, V: int, H: int, dtype: torch.dtype, has_policy: bool, has_ref: bool,
                     strides: tuple[int, int, int, int], inv_temp: float,
                     device: torch.device | None = None, softcap: float = 0.0) -> L.KernelPlan:
        arch = self._arch(device)
        cfg = self._config(arch, "fwd", int(has_policy) + int(has_ref), dtype)
        if self.num_splits is not None:
            splits = max(1, min(self.num_splits, triton.cdiv(V, cfg.block_v)))
        elif arch is None:
            splits = 1
        else:
            splits = L.vocab_splits(N, V, cfg, self._sms(device, arch))
        v_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_v) * cfg.block_v
        splits = triton.cdiv(V, v_per_split)
        ptr = {"xp_ptr": dtype, "wp_ptr": dtype, "xq_ptr": dtype, "wq_ptr": dtype,
               "y_ptr": torch.int64, "state_ptr": torch.float32}
        scalars = dict(N=N, V=V, H=H, v_per_split=v_per_split, stride_xp=strides[0], stride_wp=strides[1],
                       stride_xq=strides[2], stride_wq=strides[3], inv_temp=inv_temp, softcap=softcap or 1.0)
        constexprs = dict(HAS_POLICY=has_policy, HAS_REF=has_ref, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                          BLOCK_H=cfg.block_h, EVEN_H=H % cfg.block_h == 0, PRECISION=self._precision(dtype),
                          SOFTCAP=bool(softcap))
        return L.KernelPlan(_state_fwd_kernel, (triton.cdiv(N, cfg.block_n), splits), ptr, scalars, constexprs,
                            L.launch_options(cfg))

    def plan_dlogits(self, H: int, dtype: torch.dtype, out_dtype: torch.dtype, n0: int, n1: int, v0: int,
                     v1: int, need_u: bool, strides: tuple[int, int, int, int, int], inv_temp: float,
                     device: torch.device | None = None, softcap: float = 0.0) -> L.KernelPlan:
        cfg = self._config(self._arch(device), "dlogits", 2 if need_u else 1, dtype)
        ptr = {"xp_ptr": dtype, "wp_ptr": dtype, "xq_ptr": dtype, "wq_ptr": dtype, "y_ptr": torch.int64,
               "zp_ptr": torch.float32, "coef_ptr": torch.float32, "dz_ptr": out_dtype}
        scalars = dict(n0=n0, n1=n1, v0=v0, v1=v1, H=H, stride_xp=strides[0], stride_wp=strides[1],
                       stride_xq=strides[2], stride_wq=strides[3], stride_dz=strides[4], inv_temp=inv_temp,
                       softcap=softcap or 1.0)
        constexprs = dict(NEED_U=need_u, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                          EVEN_H=H % cfg.block_h == 0, PRECISION=self._precision(dtype), SOFTCAP=bool(softcap))
        grid = (triton.cdiv(n1 - n0, cfg.block_n), triton.cdiv(v1 - v0, cfg.block_v))
        return L.KernelPlan(_dlogits_kernel, grid, ptr, scalars, constexprs, L.launch_options(cfg))

    # ------------------------------------------------------------------------------------------ launching

    def forward_state(self, xp, wp, xq, wq, y_local, inv_temp, softcap: float = 0.0) -> torch.Tensor:
        x_any = xp if xp is not None else xq
        w_any = wp if wp is not None else wq
        N, H = x_any.shape
        V = w_any.shape[0]
        xp_, wp_ = (xp, wp) if xp is not None else (xq, wq)  # dummies when the policy half is off
        xq_, wq_ = (xq, wq) if xq is not None else (xp, wp)
        plan = self.plan_forward(N, V, H, x_any.dtype, xp is not None, xq is not None,
                                 (xp_.stride(0), wp_.stride(0), xq_.stride(0), wq_.stride(0)), inv_temp,
                                 x_any.device, softcap)
        state = torch.empty(plan.grid[1], N, STATE_WIDTH, dtype=torch.float32, device=x_any.device)
        plan.run(dict(xp_ptr=xp_, wp_ptr=wp_, xq_ptr=xq_, wq_ptr=wq_, y_ptr=y_local, state_ptr=state))
        return state[0] if plan.grid[1] == 1 else merge(state)

    def dlogits(self, xp, wp, xq, wq, y_local, zp, coef, inv_temp, n0, n1, v0, v1, need_u, out_dtype,
                softcap: float = 0.0):
        dz = torch.empty(n1 - n0, v1 - v0, dtype=out_dtype, device=xp.device)
        xq_, wq_ = (xq, wq) if need_u else (xp, wp)
        plan = self.plan_dlogits(xp.shape[1], xp.dtype, out_dtype, n0, n1, v0, v1, need_u,
                                 (xp.stride(0), wp.stride(0), xq_.stride(0), wq_.stride(0), dz.stride(0)),
                                 inv_temp, xp.device, softcap)
        plan.run(dict(xp_ptr=xp, wp_ptr=wp, xq_ptr=xq_, wq_ptr=wq_, y_ptr=y_local, zp_ptr=zp, coef_ptr=coef,
                      dz_ptr=dz))
        return dz

    @staticmethod
    def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype  # tensor-core GEMMs on the storage dtype, fp32 accumulation

    def backward_chunks(self, N: int, V: int, elem_bytes: int = 4) -> tuple[int, int]:
        """All tokens at once (each dW slice written once) and as many vocabulary rows as the
        workspace allows; token chunks only when a single vocabulary tile would not fit. The
        workspace is sized at 4 bytes an element whatever the storage dtype (headroom for the GEMMs)."""
        granule = self.config.block_v if self.config else (L.INTERPRET.block_v if L.interpreting() else 128)
        vocab_chunk = max(granule, (self.workspace_bytes // (elem_bytes * max(N, 1))) // granule * granule)
        token_chunk = N if vocab_chunk * N * elem_bytes <= self.workspace_bytes else max(
            16, self.workspace_bytes // (elem_bytes * vocab_chunk))
        return token_chunk, min(vocab_chunk, V)
