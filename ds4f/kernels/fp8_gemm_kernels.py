"""⑥ kernels, fp8_gemm's Triton programs: the weight-only ("w8") GEMM with its K-split reduce, the per-token
activation quantization and the e4m3 x e4m3 ("a8w8") GEMM. ds4f/kernels/fp8_gemm.py holds the schemes' choice, the
launches and the references."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.fp8_gemv_kernels import quant_rows
except ImportError:  # CPU-only installs: fp8_linear falls back to the reference
    triton = None

if triton is not None:

    @triton.jit
    def _block_scale(ptrs, SCALE_E8M0: tl.constexpr):
        s = tl.load(ptrs)
        if SCALE_E8M0:  # UE8M0 byte b -> 2^(b-127) as fp32 bits (b == 0 gives 0, not 2^-127)
            s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _load_k(a_ptrs, b_ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
        # the K chunk at k0 of two [rows, BLOCK_K] operands (columns past K read as 0 unless EVEN_K)
        if EVEN_K:
            return tl.load(a_ptrs + k0), tl.load(b_ptrs + k0)
        kmask = (k0 + offs_k) < K
        return (tl.load(a_ptrs + k0, mask=kmask[None, :], other=0.0),
                tl.load(b_ptrs + k0, mask=kmask[None, :], other=0.0))

    @triton.jit
    def _w8_kernel(
        x_ptr, w_ptr, ws_ptr, o_ptr, p_ptr, cnt_ptr, M, N, K, G, s_xm, s_xg, s_wsn, s_op, s_om, s_og,
        CHUNKS: tl.constexpr, SPLITS: tl.constexpr, SERIAL: tl.constexpr, NATIVE: tl.constexpr,
        SCALE_E8M0: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program = (BLOCK_N columns of group g, K chunks [pid_s*CHUNKS, +CHUNKS), BLOCK_M rows)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2) // G
        g = tl.program_id(2) % G
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        wrow = g * N + rn % N  # rows past N re-read row N-1's block; the store drops them
        x_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * s_xm + g * s_xg + offs_k[None, :]
        w_ptrs = w_ptr + wrow.to(tl.int64)[:, None] * K + offs_k[None, :]
        ws_ptrs = ws_ptr + (wrow // 128) * s_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for i in range(0, CHUNKS):  # CHUNKS divides the K chunk count: no split runs past K
            k0 = (pid_s * CHUNKS + i) * BLOCK_K
            xa, wq = _load_k(x_ptrs, w_ptrs, k0, offs_k, K, EVEN_K)
            if NATIVE:
                wb = wq.to(tl.bfloat16)
            else:  # e4m3 byte -> fp16 bits of value / 256 (sign to bit 15, exponent|mantissa to bits 7..13)
                h = wq.to(tl.uint16)
                wb = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.bfloat16)
            s = _block_scale(ws_ptrs + k0 // 128, SCALE_E8M0)
            if not NATIVE:
                s = s * 256.0
            xa = xa.to(tl.bfloat16)
            if DOT_F32:  # the interpreter's bf16 tl.dot multiplies raw bits; same values in fp32
                xa = xa.to(tl.float32)
                wb = wb.to(tl.float32)
            acc += tl.dot(xa, tl.trans(wb)) * s[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        o_ptrs = o_ptr + rm.to(tl.int64)[:, None] * s_om + g * s_og + rn[None, :]
        if SPLITS == 1:
            tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask)
        else:  # fp32 partials p [SPLITS, M, G, N]
            p_ptrs = p_ptr + rm.to(tl.int64)[:, None] * s_om + g * s_og + rn[None, :]
            tl.store(p_ptrs + pid_s * s_op, acc, mask=mask)
            if SERIAL:  # the last split of a tile to finish sums all partials in split order, then re-arms the count
                tile = tl.program_id(2) * tl.num_programs(0) + pid_n
                tl.debug_barrier()  # every thread's partial is stored before the release below
                done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
                if done == SPLITS - 1:
                    tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    for sp in range(SPLITS):
                        tot += tl.load(p_ptrs + sp * s_op, mask=mask, other=0.0, cache_modifier=".cg")
                    tl.store(o_ptrs, tot.to(o_ptr.dtype.element_ty), mask=mask)
                    tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _sum_splits(p_ptr, o_ptr, L, S: tl.constexpr, BLOCK: tl.constexpr):
        # p [S, L] fp32 -> o [L] = Σ_s p[s]
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(S):
            acc += tl.load(p_ptr + s * L + offs, mask=mask, other=0.0)
        tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, KB, s_xm, s_xg, s_qm, POW2: tl.constexpr, SW_ROUND: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        # program = (BLOCK_M tokens, one 128-column block j = g * KB + kb); scales stored transposed [G*KB, M]
        j = tl.program_id(1)
        g = j // KB
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = (j % KB) * 128 + tl.arange(0, 128)
        mask = (rm < M)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * s_xm + g * s_xg + rk[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if POW2:
            q, scale = quant_rows(x, SW_ROUND)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4) / 448.0
            q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
            if SW_ROUND:  # the interpreter's fp8 cast mis-rounds: snap to the e4m3 grid first (RTNE by an fp32 add)
                e8 = tl.maximum(((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # grid step 2^(e8-3)
                c = (((e8 + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e8+20)
                q = (q + c) - c
        tl.store(q_ptr + rm.to(tl.int64)[:, None] * s_qm + g * K + rk[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(s_ptr + j * M + rm, scale, mask=rm < M)

    @triton.jit
    def _a8w8_kernel(
        a_ptr, as_ptr, w_ptr, ws_ptr, o_ptr, M, N, K, s_am, s_wsn, s_om,
        KB: tl.constexpr, SCALE_E8M0: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # program = one [BLOCK_M, BLOCK_N] tile of group g (axis 1); tiles ordered in GROUP_M row bands for L2 reuse
        pid = tl.program_id(0)
        g = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        band = GROUP_M * num_n
        first_m = (pid // band) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % rows
        pid_n = (pid % band) // rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        am = rm % M
        wrow = g * N + rn % N
        a_ptrs = a_ptr + am.to(tl.int64)[:, None] * s_am + g * K + offs_k[None, :]
        w_ptrs = w_ptr + wrow.to(tl.int64)[:, None] * K + offs_k[None, :]
        as_ptrs = as_ptr + g * KB * M + am
        ws_ptrs = ws_ptr + (wrow // 128) * s_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, KB):
            k0 = kb * BLOCK_K
            a, w = _load_k(a_ptrs, w_ptrs, k0, offs_k, K, EVEN_K)
            sa = tl.load(as_ptrs + kb * M)
            sw = _block_scale(ws_ptrs + kb, SCALE_E8M0)
            acc += tl.dot(a, tl.trans(w)) * (sa[:, None] * sw[None, :])
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(o_ptr + rm.to(tl.int64)[:, None] * s_om + g * N + rn[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=mask)
