"""Triton kernels for batched SIRENs: forward, and fused fit steps (forward + MSE + backward + Adam).

Layouts follow nfkernels/siren.py: params [N, P] with per layer W [out, in] row-major then b [out].
Feature dims are padded to HP = max(16, next power of two of hidden) so the hidden×hidden products
can use tl.dot (fp32, input_precision="ieee": exact fp32 products, no tf32).

The fit kernel is persistent: G programs, each fitting fields pid, pid + G, ... one at a time, all
`n_steps` steps in one launch, so a field's weights/Adam state stay in L1/L2 and the launch overhead
is paid once per call. Per pixel tile it runs the forward (sin and cos of every pre-activation computed
once by one polynomial and kept for the backward in a per-program scratch), the per-field MSE, and the
backward; weight gradients are reduced over the tile with tl.dot / tl.sum and accumulated per field in a
per-program gradient buffer; then Adam updates the field in place.
"""
from __future__ import annotations

import torch

from nfkernels._ext import HAS_TRITON

MAX_WIDTH = 128  # widest layer the kernels take (registers); wider falls back to torch under auto
MAX_IN_OUT = 4
MAX_SINE_LAYERS = 8


def supports(spec) -> bool:
    return (spec.hidden <= MAX_WIDTH and spec.in_dim <= MAX_IN_OUT and spec.out_dim <= MAX_IN_OUT
            and spec.hidden_layers <= MAX_SINE_LAYERS)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sincos(x):
        # Cody-Waite reduction by pi/2 + Cephes minimax polynomials on [-pi/4, pi/4]; the same math as
        # csrc/siren_cpu.cpp (abs error ~1e-7 for |x| < 1e4), and sin and cos share the reduction.
        q = tl.floor(x * 0.636619772367581343 + 0.5)
        qi = q.to(tl.int32)
        r = x - q * 1.5703125
        r = r - q * 4.837512969970703125e-4
        r = r - q * 7.54978995489188216e-8
        r2 = r * r
        ps = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
        pc = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
        swap = (qi & 1) != 0
        sv = tl.where(swap, pc, ps)
        cv = tl.where(swap, ps, pc)
        s = tl.where((qi & 2) != 0, -sv, sv)
        c = tl.where(((qi + 1) & 2) != 0, -cv, cv)
        return s, c

    @triton.jit
    def _sincos_mufu(x):
        # The GPU's special-function unit: sin.approx / cos.approx are one MUFU op each after one shared FMUL to
        # turns, against ~20 instructions a pair for the polynomial. Abs error 2^-21.41 on [-pi, pi] (the CUDA
        # guide's bound for __sinf), larger beyond it; the GPU tests hold a 25-step fit to the reference. PTX
        # only: the interpreter and the CPU take _sincos.
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $2;\n\tcos.approx.f32 $1, $2;", "=r,=r,r", [x],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _sincos_by(x, SINCOS: tl.constexpr):
        if SINCOS == "mufu":
            s, c = _sincos_mufu(x)
        else:
            s, c = _sincos(x)
        return s, c

    @triton.jit
    def _first_layer(pf, x_ptr, rows, rmask, offs_h, hmask, omega0, IN: tl.constexpr, H: tl.constexpr,
                     BLOCK_C: tl.constexpr, HP: tl.constexpr):
        # in_dim is 1-4: a few broadcast FMAs beat a padded tl.dot.
        z = tl.zeros((BLOCK_C, HP), dtype=tl.float32) + tl.load(pf + H * IN + offs_h, mask=hmask, other=0.0)[None, :]
        for i in tl.static_range(IN):
            xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
            wi = tl.load(pf + offs_h * IN + i, mask=hmask, other=0.0)
            z += xi[:, None] * wi[None, :]
        return z * omega0

    @triton.jit
    def _forward_kernel(p_ptr, x_ptr, out_ptr, C, P, omega0, IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                        NS: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr):
        f = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < C
        offs_h = tl.arange(0, HP)
        hmask = offs_h < H
        pf = p_ptr + f * P
        h, _ = _sincos(_first_layer(pf, x_ptr, rows, rmask, offs_h, hmask, omega0, IN, H, BLOCK_C, HP))
        off = H * IN + H
        for k in tl.static_range(1, NS):
            wt = tl.load(pf + off + offs_h[None, :] * H + offs_h[:, None], mask=hmask[:, None] & hmask[None, :],
                         other=0.0)  # wt[i, o] = W[o, i]
            b = tl.load(pf + off + H * H + offs_h, mask=hmask, other=0.0)
            z = tl.dot(h, wt, input_precision="ieee") + b[None, :]
            h, _ = _sincos(z * omega0)
            off += H * H + H
        for o in tl.static_range(OUT):
            wo = tl.load(pf + off + o * H + offs_h, mask=hmask, other=0.0)
            yo = tl.sum(h * wo[None, :], axis=1) + tl.load(pf + off + OUT * H + o)
            tl.store(out_ptr + f * C * OUT + rows * OUT + o, yo, mask=rmask)

    @triton.jit
    def _accumulate(ptr, val, mask):
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)

    @triton.jit
    def _field_ptrs(p_ptr, m_ptr, v_ptr, y_ptr, f, P, CO):
        # Field f's parameters, Adam moments and target image (int64: N·P passes 2^31 at ~2M fields).
        f64 = tl.cast(f, tl.int64)
        return p_ptr + f64 * P, m_ptr + f64 * P, v_ptr + f64 * P, y_ptr + f64 * CO

    @triton.jit
    def _fit_kernel(p_ptr, m_ptr, v_ptr, loss_ptr, x_ptr, y_ptr, act_ptr, bc_ptr, grad_ptr, scr_ptr,
                    N, C, P, n_steps, lr, beta1, beta2, eps, omega0, grad_scale, inv_count,
                    HAS_ACTIVE: tl.constexpr, IN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                    NS: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        offs_c = tl.arange(0, BLOCK_C)
        offs_h = tl.arange(0, HP)
        offs_p = tl.arange(0, BLOCK_P)
        hmask = offs_h < H
        hh_mask = hmask[:, None] & hmask[None, :]
        tile = offs_c[:, None] * HP + offs_h[None, :]  # [BLOCK_C, HP] slot in the scratch
        scr_sin = scr_ptr + tl.cast(pid, tl.int64) * (2 * NS * BLOCK_C * HP)
        scr_cos = scr_sin + NS * BLOCK_C * HP
        gacc = grad_ptr + tl.cast(pid, tl.int64) * P
        off_last = H * IN + H + (NS - 1) * (H * H + H)
        for f in range(pid, N, n_prog):
            pf, mf, vf, yf = _field_ptrs(p_ptr, m_ptr, v_ptr, y_ptr, f, P, C * OUT)
            on = 1
            if HAS_ACTIVE:
                on = tl.load(act_ptr + f).to(tl.int32)  # 1 or 0
            n_run = 1 + (n_steps - 1) * on  # an inactive field is only evaluated (its loss), not updated
            for s in range(n_run):
                for k0 in range(0, P, BLOCK_P):
                    tl.store(gacc + k0 + offs_p, tl.zeros((BLOCK_P,), dtype=tl.float32), mask=k0 + offs_p < P)
                sq = tl.sum(tl.zeros((BLOCK_C,), dtype=tl.float32), axis=0)
                for c0 in range(0, C, BLOCK_C):
                    rows = c0 + offs_c
                    rmask = rows < C
                    tl.debug_barrier()
                    # ---- forward, keeping sin (= next layer's input) and cos of every sine layer
                    hs, hc = _sincos(_first_layer(pf, x_ptr, rows, rmask, offs_h, hmask, omega0, IN, H, BLOCK_C, HP))
                    tl.store(scr_sin + tile, hs)
                    tl.store(scr_cos + tile, hc)
                    off = H * IN + H
                    for k in tl.static_range(1, NS):
                        wt = tl.load(pf + off + offs_h[None, :] * H + offs_h[:, None], mask=hh_mask, other=0.0)
                        b = tl.load(pf + off + H * H + offs_h, mask=hmask, other=0.0)
                        hs, hc = _sincos((tl.dot(hs, wt, input_precision="ieee") + b[None, :]) * omega0)
                        tl.store(scr_sin + k * BLOCK_C * HP + tile, hs)
                        tl.store(scr_cos + k * BLOCK_C * HP + tile, hc)
                        off += H * H + H
                    # ---- output layer, loss, and its gradient
                    dh = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                    for o in tl.static_range(OUT):
                        wo = tl.load(pf + off_last + o * H + offs_h, mask=hmask, other=0.0)
                        yo = tl.sum(hs * wo[None, :], axis=1) + tl.load(pf + off_last + OUT * H + o)
                        t = tl.load(yf + rows * OUT + o, mask=rmask, other=0.0)
                        e = tl.where(rmask, yo - t, 0.0)
                        sq += tl.sum(e * e, axis=0)
                        dy = e * grad_scale
                        _accumulate(gacc + off_last + o * H + offs_h, tl.sum(dy[:, None] * hs, axis=0), hmask)
                        tl.store(gacc + off_last + OUT * H + o, tl.load(gacc + off_last + OUT * H + o) + tl.sum(dy, axis=0))
                        dh += dy[:, None] * wo[None, :]
                    tl.debug_barrier()
                    # ---- backward through the hidden sine layers, last to second
                    for j in tl.static_range(NS - 1):
                        k = NS - 1 - j
                        off = H * IN + H + (k - 1) * (H * H + H)
                        g = dh * omega0 * tl.load(scr_cos + k * BLOCK_C * HP + tile)
                        h_in = tl.load(scr_sin + (k - 1) * BLOCK_C * HP + tile)
                        dw = tl.dot(tl.trans(g), h_in, input_precision="ieee")  # [out, in]
                        _accumulate(gacc + off + offs_h[:, None] * H + offs_h[None, :], dw, hh_mask)
                        _accumulate(gacc + off + H * H + offs_h, tl.sum(g, axis=0), hmask)
                        w = tl.load(pf + off + offs_h[:, None] * H + offs_h[None, :], mask=hh_mask, other=0.0)
                        dh = tl.dot(g, w, input_precision="ieee")
                    # ---- first layer
                    g = dh * omega0 * tl.load(scr_cos + tile)
                    for i in tl.static_range(IN):
                        xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
                        _accumulate(gacc + offs_h * IN + i, tl.sum(g * xi[:, None], axis=0), hmask)
                    _accumulate(gacc + H * IN + offs_h, tl.sum(g, axis=0), hmask)
                tl.store(loss_ptr + f, sq * inv_count)
                tl.debug_barrier()
                # ---- Adam (as siren_fit_steps_reference); bias corrections precomputed per step in fp64
                bc1 = tl.load(bc_ptr + 2 * s)
                bc2 = tl.load(bc_ptr + 2 * s + 1)
                for k0 in range(0, P, BLOCK_P):
                    kk = k0 + offs_p
                    km = kk < P * on  # nothing when inactive
                    gk = tl.load(gacc + kk, mask=km, other=0.0)
                    mk = beta1 * tl.load(mf + kk, mask=km, other=0.0) + (1.0 - beta1) * gk
                    vk = beta2 * tl.load(vf + kk, mask=km, other=0.0) + (1.0 - beta2) * gk * gk
                    tl.store(mf + kk, mk, mask=km)
                    tl.store(vf + kk, vk, mask=km)
                    pk = tl.load(pf + kk, mask=km, other=0.0)
                    tl.store(pf + kk, pk - (mk / bc1) / (tl.sqrt(vk / bc2) + eps) * lr, mask=km)
                tl.debug_barrier()

    @triton.jit
    def _row(t, offs, r):
        # Row r of a small [R, HP] register tile, as an [HP] vector.
        return tl.sum(tl.where(offs[:, None] == r, t, 0.0), axis=0)

    @triton.jit
    def _adam_tensor(w, g, m, v, mask, on, lr, beta1, beta2, eps, bc1, bc2):
        # One Adam step of a register-resident weight tile and its moments (as siren_fit_steps_reference). An
        # inactive field (on == 0) stays as it is.
        upd = (mask.to(tl.int32) * on) != 0  # full-shaped: the interpreter rejects mask & 0-d
        m_new = beta1 * m + (1.0 - beta1) * g
        v_new = beta2 * v + (1.0 - beta2) * g * g
        w_new = w - (m_new / bc1) / (tl.sqrt(v_new / bc2) + eps) * lr
        return tl.where(upd, w_new, w), tl.where(upd, m_new, m), tl.where(upd, v_new, v)

    @triton.jit
    def _load_pair(mf, vf, off, mask):
        return tl.load(mf + off, mask=mask, other=0.0), tl.load(vf + off, mask=mask, other=0.0)

    @triton.jit
    def _store_pair(mf, vf, off, mask, m, v):
        tl.store(mf + off, m, mask=mask)
        tl.store(vf + off, v, mask=mask)

    @triton.jit
    def _adam_in_memory(w, g, mf, vf, off, mask, on, lr, beta1, beta2, eps, bc1, bc2):
        # _adam_tensor with the moments read from and written back to global memory (L1/L2-resident), so they
        # hold no registers through the pixel loop. A value held by several threads is stored by one of them,
        # which must not run ahead of another's load: hence the barrier between them, one tensor at a time so
        # that only one tensor's moments are live at once. The caller puts a barrier after the step as well.
        m, v = _load_pair(mf, vf, off, mask)
        tl.debug_barrier()
        w, m, v = _adam_tensor(w, g, m, v, mask, on, lr, beta1, beta2, eps, bc1, bc2)
        _store_pair(mf, vf, off, mask, m, v)
        return w

    @triton.jit
    def _fit_kernel_regs(p_ptr, m_ptr, v_ptr, loss_ptr, x_ptr, y_ptr, act_ptr, bc_ptr,
                         N, C, P, n_steps, lr, beta1, beta2, eps, omega0, grad_scale, inv_count,
                         HAS_ACTIVE: tl.constexpr, IN: tl.constexpr, INP: tl.constexpr, H: tl.constexpr,
                         HP: tl.constexpr, NS: tl.constexpr, OUT: tl.constexpr, OUTP: tl.constexpr,
                         BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, SINCOS: tl.constexpr = "poly",
                         DEFER: tl.constexpr = False, MOMENTS: tl.constexpr = "regs"):
        # The one- and two-sine-layer SIRENs (the default 2→32→32→1 among them) with everything in registers: a
        # field's weights, Adam moments and gradient sums stay in registers across all pixel tiles and all steps,
        # and a tile's sin/cos go straight from the forward into the backward, so global memory sees only the
        # image and the coordinates (both L2-resident) inside the step loop. Nothing written inside a field's
        # loop is read back: Triton stores a value held by several threads from one of them only, so a
        # store-then-load through global memory would race across threads without a barrier (an earlier version
        # kept m and v in global memory and lost updates that way on the H100; the interpreter cannot show it).
        # MOMENTS "memory" does keep m and v there again, with barriers between loads and stores (_adam_in_memory).
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        offs_c = tl.arange(0, BLOCK_C)
        offs_h = tl.arange(0, HP)
        offs_i = tl.arange(0, INP)
        offs_o = tl.arange(0, OUTP)
        hmask = offs_h < H
        imask = offs_i < IN
        omask = offs_o < OUT
        w1_off = offs_h[:, None] * IN + offs_i[None, :]
        w1_mask = hmask[:, None] & imask[None, :]
        b1_off = H * IN + offs_h
        w2_off = H * IN + H + offs_h[:, None] * H + offs_h[None, :]
        hh_mask = hmask[:, None] & hmask[None, :]
        b2_off = H * IN + H + H * H + offs_h
        off_last = H * IN + H + (NS - 1) * (H * H + H)
        wo_off = off_last + offs_o[:, None] * H + offs_h[None, :]
        oh_mask = omask[:, None] & hmask[None, :]
        bo_off = off_last + OUT * H + offs_o
        for f in range(pid, N, n_prog):
            pf, mf, vf, yf = _field_ptrs(p_ptr, m_ptr, v_ptr, y_ptr, f, P, C * OUT)
            on = tl.full((), 1, tl.int32)
            if HAS_ACTIVE:
                on = tl.load(act_ptr + f).to(tl.int32)
            n_run = 1 + (n_steps - 1) * on  # an inactive field is only evaluated (its loss), not updated
            w1 = tl.load(pf + w1_off, mask=w1_mask, other=0.0)
            b1 = tl.load(pf + b1_off, mask=hmask, other=0.0)
            if NS == 2:
                w2 = tl.load(pf + w2_off, mask=hh_mask, other=0.0)
                b2 = tl.load(pf + b2_off, mask=hmask, other=0.0)
            else:
                w2 = tl.zeros((HP, HP), dtype=tl.float32)
                b2 = tl.zeros((HP,), dtype=tl.float32)
            wo = tl.load(pf + wo_off, mask=oh_mask, other=0.0)
            bo = tl.load(pf + bo_off, mask=omask, other=0.0)
            if MOMENTS == "regs":
                m_w1, v_w1 = _load_pair(mf, vf, w1_off, w1_mask)
                m_b1, v_b1 = _load_pair(mf, vf, b1_off, hmask)
                if NS == 2:
                    m_w2, v_w2 = _load_pair(mf, vf, w2_off, hh_mask)
                    m_b2, v_b2 = _load_pair(mf, vf, b2_off, hmask)
                m_wo, v_wo = _load_pair(mf, vf, wo_off, oh_mask)
                m_bo, v_bo = _load_pair(mf, vf, bo_off, omask)
            for s in range(n_run):
                gw1 = tl.zeros((HP, INP), dtype=tl.float32)
                gb1 = tl.zeros((HP,), dtype=tl.float32)
                gw2 = tl.zeros((HP, HP), dtype=tl.float32)
                gb2 = tl.zeros((HP,), dtype=tl.float32)
                gwo = tl.zeros((OUTP, HP), dtype=tl.float32)
                gbo = tl.zeros((OUTP,), dtype=tl.float32)
                sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
                # DEFER: the sums over pixels of the bias, first-layer and (one output) output-layer gradients
                # are kept per (row of the tile, neuron) in registers and summed over the rows once a step, not
                # once a tile: a sum over the rows of a tile crosses threads and warps (shuffles, shared memory,
                # barriers) where these accumulators cost one FMA an element.
                a_b1 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_b2 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_wo = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_bo = tl.zeros((BLOCK_C, OUTP), dtype=tl.float32)
                a_w1_0 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_w1_1 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_w1_2 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                a_w1_3 = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                w2t = tl.trans(w2)
                for c0 in range(0, C, BLOCK_C):
                    rows = c0 + offs_c
                    rmask = rows < C
                    z1 = tl.zeros((BLOCK_C, HP), dtype=tl.float32) + b1[None, :]
                    for i in tl.static_range(IN):  # in_dim 1-4: broadcast FMAs, not a padded dot
                        xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
                        z1 += xi[:, None] * tl.sum(tl.where(offs_i[None, :] == i, w1, 0.0), axis=1)[None, :]
                    s1, c1 = _sincos_by(z1 * omega0, SINCOS)
                    if NS == 2:
                        s2, c2 = _sincos_by((tl.dot(s1, w2t, input_precision=PRECISION) + b2[None, :]) * omega0, SINCOS)
                    else:
                        s2, c2 = s1, c1
                    # The output layer one output at a time, in 2-D tiles only. Triton turns a sum over a
                    # broadcast 3-D product into tt.dot, here with K = OUTP (1-4): on the H100 (Triton 3.6) that dot
                    # counted K's replicated lanes, dh came out 8x at OUTP = 1 and 2x at OUTP = 4 (the interpreter
                    # was exact). The TTGIR for sm_90 now holds only the hidden layer's dots (K = HP).
                    ymask = rmask[:, None] & omask[None, :]
                    y = tl.zeros((BLOCK_C, OUTP), dtype=tl.float32) + bo[None, :]
                    for o in tl.static_range(OUT):
                        y_o = tl.sum(s2 * _row(wo, offs_o, o)[None, :], axis=1)
                        y += tl.where(offs_o[None, :] == o, y_o[:, None], 0.0)
                    e = tl.where(ymask, y - tl.load(yf + rows[:, None] * OUT + offs_o[None, :], mask=ymask, other=0.0),
                                 0.0)
                    sq += tl.sum(e * e, axis=1)
                    dy = e * grad_scale
                    if DEFER:
                        a_bo += dy
                    else:
                        gbo += tl.sum(dy, axis=0)
                    dh = tl.zeros((BLOCK_C, HP), dtype=tl.float32)
                    for o in tl.static_range(OUT):
                        dy_o = tl.sum(tl.where(offs_o[None, :] == o, dy, 0.0), axis=1)  # [BLOCK_C]
                        if DEFER and OUT == 1:
                            a_wo += dy_o[:, None] * s2
                        else:
                            gwo += tl.where(offs_o[:, None] == o, tl.sum(dy_o[:, None] * s2, axis=0)[None, :], 0.0)
                        dh += dy_o[:, None] * _row(wo, offs_o, o)[None, :]
                    if NS == 2:
                        g2 = dh * omega0 * c2
                        gw2 += tl.dot(tl.trans(g2), s1, input_precision=PRECISION)
                        if DEFER:
                            a_b2 += g2
                        else:
                            gb2 += tl.sum(g2, axis=0)
                        dh = tl.dot(g2, w2, input_precision=PRECISION)
                    g1 = dh * omega0 * c1
                    if DEFER:
                        a_b1 += g1
                        a_w1_0 += g1 * tl.load(x_ptr + rows * IN, mask=rmask, other=0.0)[:, None]
                        if IN > 1:
                            a_w1_1 += g1 * tl.load(x_ptr + rows * IN + 1, mask=rmask, other=0.0)[:, None]
                        if IN > 2:
                            a_w1_2 += g1 * tl.load(x_ptr + rows * IN + 2, mask=rmask, other=0.0)[:, None]
                        if IN > 3:
                            a_w1_3 += g1 * tl.load(x_ptr + rows * IN + 3, mask=rmask, other=0.0)[:, None]
                    else:
                        for i in tl.static_range(IN):
                            xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
                            gw1 += tl.where(offs_i[None, :] == i, tl.sum(g1 * xi[:, None], axis=0)[:, None], 0.0)
                        gb1 += tl.sum(g1, axis=0)
                if DEFER:
                    gbo = tl.sum(a_bo, axis=0)
                    gb1 = tl.sum(a_b1, axis=0)
                    gb2 = tl.sum(a_b2, axis=0)
                    if OUT == 1:
                        gwo = tl.sum(a_wo, axis=0)[None, :]
                    gw1 = tl.where(offs_i[None, :] == 0, tl.sum(a_w1_0, axis=0)[:, None], 0.0)
                    gw1 += tl.where(offs_i[None, :] == 1, tl.sum(a_w1_1, axis=0)[:, None], 0.0)
                    gw1 += tl.where(offs_i[None, :] == 2, tl.sum(a_w1_2, axis=0)[:, None], 0.0)
                    gw1 += tl.where(offs_i[None, :] == 3, tl.sum(a_w1_3, axis=0)[:, None], 0.0)
                tl.store(loss_ptr + f, tl.sum(sq, axis=0) * inv_count)
                bc1 = tl.load(bc_ptr + 2 * s)
                bc2 = tl.load(bc_ptr + 2 * s + 1)
                if MOMENTS == "memory":
                    adam = (on, lr, beta1, beta2, eps, bc1, bc2)
                    w1 = _adam_in_memory(w1, gw1, mf, vf, w1_off, w1_mask, *adam)
                    b1 = _adam_in_memory(b1, gb1, mf, vf, b1_off, hmask, *adam)
                    if NS == 2:
                        w2 = _adam_in_memory(w2, gw2, mf, vf, w2_off, hh_mask, *adam)
                        b2 = _adam_in_memory(b2, gb2, mf, vf, b2_off, hmask, *adam)
                    wo = _adam_in_memory(wo, gwo, mf, vf, wo_off, oh_mask, *adam)
                    bo = _adam_in_memory(bo, gbo, mf, vf, bo_off, omask, *adam)
                    tl.debug_barrier()  # the stores land before the next step's loads
                else:
                    w1, m_w1, v_w1 = _adam_tensor(w1, gw1, m_w1, v_w1, w1_mask, on, lr, beta1, beta2, eps, bc1, bc2)
                    b1, m_b1, v_b1 = _adam_tensor(b1, gb1, m_b1, v_b1, hmask, on, lr, beta1, beta2, eps, bc1, bc2)
                    if NS == 2:
                        w2, m_w2, v_w2 = _adam_tensor(w2, gw2, m_w2, v_w2, hh_mask, on, lr, beta1, beta2, eps, bc1,
                                                      bc2)
                        b2, m_b2, v_b2 = _adam_tensor(b2, gb2, m_b2, v_b2, hmask, on, lr, beta1, beta2, eps, bc1, bc2)
                    wo, m_wo, v_wo = _adam_tensor(wo, gwo, m_wo, v_wo, oh_mask, on, lr, beta1, beta2, eps, bc1, bc2)
                    bo, m_bo, v_bo = _adam_tensor(bo, gbo, m_bo, v_bo, omask, on, lr, beta1, beta2, eps, bc1, bc2)
            tl.store(pf + w1_off, w1, mask=w1_mask)
            tl.store(pf + b1_off, b1, mask=hmask)
            if NS == 2:
                tl.store(pf + w2_off, w2, mask=hh_mask)
                tl.store(pf + b2_off, b2, mask=hmask)
            tl.store(pf + wo_off, wo, mask=oh_mask)
            tl.store(pf + bo_off, bo, mask=omask)
            if MOMENTS == "regs":
                _store_pair(mf, vf, w1_off, w1_mask, m_w1, v_w1)
                _store_pair(mf, vf, b1_off, hmask, m_b1, v_b1)
                if NS == 2:
                    _store_pair(mf, vf, w2_off, hh_mask, m_w2, v_w2)
                    _store_pair(mf, vf, b2_off, hmask, m_b2, v_b2)
                _store_pair(mf, vf, wo_off, oh_mask, m_wo, v_wo)
                _store_pair(mf, vf, bo_off, omask, m_bo, v_bo)


def _launch_shape(spec):
    hp = max(16, triton.next_power_of_2(spec.hidden))
    block_c = 64 if hp <= 32 else 32  # keeps the [BLOCK_C, HP] tiles and HP×HP weights in registers
    return hp, block_c


def _forward(params: torch.Tensor, coords: torch.Tensor, spec) -> torch.Tensor:
    params, coords = params.contiguous(), coords.contiguous()
    n, c = params.shape[0], coords.shape[0]
    out = torch.empty(n, c, spec.out_dim, device=params.device, dtype=torch.float32)
    if n == 0 or c == 0:
        return out
    hp, block_c = _launch_shape(spec)
    grid = (n, triton.cdiv(c, block_c))
    _forward_kernel[grid](params, coords, out, c, spec.num_params, float(spec.omega0), IN=spec.in_dim, H=spec.hidden,
                          HP=hp, NS=spec.hidden_layers, OUT=spec.out_dim, BLOCK_C=block_c, num_warps=4)
    return out


class _Forward(torch.autograd.Function):
    """Triton forward; the backward is the reference's vector-Jacobian product (the fit uses the fused kernel)."""

    @staticmethod
    def forward(ctx, params, coords, spec):
        ctx.save_for_backward(params, coords)
        ctx.spec = spec
        return _forward(params, coords, spec)

    @staticmethod
    def backward(ctx, grad_out):
        from nfkernels.siren import siren_forward_reference

        params, coords = ctx.saved_tensors
        with torch.enable_grad():
            p = params.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(siren_forward_reference(p, coords, ctx.spec), p, grad_out)
        return grad, None, None


def siren_forward(params: torch.Tensor, coords: torch.Tensor, spec) -> torch.Tensor:
    if params.requires_grad and torch.is_grad_enabled():
        return _Forward.apply(params, coords, spec)
    return _forward(params, coords, spec)


def _num_programs(n: int, device: torch.device, per_sm: int = 8) -> int:
    if device.type == "cuda":
        return min(n, per_sm * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n, 16)  # the interpreter runs programs one after another


DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")
# The regs kernel's code variant when siren_fit_steps is not told one (the dispatcher and `nfgen fit` never tell
# it): the measured one until a GPU has timed the others. benchmarks.fit_precision sets FAST_VARIANT here to
# see what it does to the fitted fields.
DEFAULT_VARIANT = dict(sincos="poly", defer_sums=False, moments="regs")
FAST_VARIANT = dict(sincos="mufu", defer_sums=True, moments="memory")
REGS_VARIANT = dict(DEFAULT_VARIANT)


def fits_in_registers(spec) -> bool:
    """Whether the register-resident fit kernel takes `spec` (1-2 sine layers, width ≤ 64)."""
    return spec.hidden_layers <= 2 and spec.hidden <= 64


def siren_fit_steps(params, exp_avg, exp_avg_sq, step, coords, target, spec, *, lr, betas, eps, n_steps,
                    active, dot_precision: str = "ieee", kernel: str = "auto", block_c: int | None = None,
                    num_warps: int = 4, programs_per_sm: int = 8, sincos: str | None = None,
                    defer_sums: bool | None = None, moments: str | None = None) -> torch.Tensor:
    """In-place fused fit on contiguous float32 [N, P] buffers; target [N, C, out_dim]; returns loss [N].

    kernel: "regs" (weights, Adam moments and gradient sums in registers; 1-2 sine layers, width ≤ 64),
    "scratch" (any shape the module takes; activations and gradients in a per-program global scratch) or
    "auto" (regs where it takes the shape, else scratch: on the H100 regs fits the default SIREN 2.2× (fp32) to
    4.6× (tf32) faster, benchmarks/results/fit-h100.json). dot_precision: the hidden×hidden products in exact
    fp32 ("ieee") or on tensor cores ("tf32", "tf32x3"). block_c / num_warps / programs_per_sm are launch
    knobs for benchmarks, and so are the regs kernel's code variants, until a GPU has timed them:
    sincos "mufu" (the GPU's sin.approx / cos.approx instead of the polynomial; CUDA only), defer_sums (sum the
    bias and first/output-layer gradients over pixels once a step, not once a tile) and moments "memory" (Adam
    moments in global memory, freeing their registers); None takes REGS_VARIANT's. Compiled for sm_90 the three
    cut the tf32 pixel loop from 4064 to 2008 instructions a pixel and the registers from 204 to 168
    (`python -m benchmarks.ptxas_siren`, benchmarks/results/ptxas-siren-sm90.json).
    """
    sincos = REGS_VARIANT["sincos"] if sincos is None else sincos
    defer_sums = REGS_VARIANT["defer_sums"] if defer_sums is None else defer_sums
    moments = REGS_VARIANT["moments"] if moments is None else moments
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    if sincos not in ("poly", "mufu") or moments not in ("regs", "memory"):
        raise ValueError(f"sincos must be poly or mufu and moments regs or memory, got {sincos!r} and {moments!r}")
    if sincos == "mufu" and params.device.type != "cuda":
        raise ValueError("sincos='mufu' is a PTX instruction and needs a CUDA GPU; use sincos='poly'")
    if kernel == "auto":
        kernel = "regs" if fits_in_registers(spec) else "scratch"
    if kernel not in ("regs", "scratch") or (kernel == "regs" and not fits_in_registers(spec)):
        raise ValueError(f"kernel {kernel!r} does not take {spec}; use auto, regs (≤ 2 sine layers, width ≤ 64) "
                         "or scratch")
    if kernel == "scratch" and (sincos, defer_sums, moments) != ("poly", False, "regs"):
        raise ValueError("sincos, defer_sums and moments are options of the regs kernel, not of scratch")
    n, c = params.shape[0], coords.shape[0]
    loss = torch.zeros(n, device=params.device, dtype=torch.float32)
    if n == 0 or c == 0:
        return loss
    hp, default_block_c = _launch_shape(spec)
    if kernel == "regs" and dot_precision != "ieee" and hp == 32:
        default_block_c = 16  # the H100 sweep's best for tensor-core dots at width 32 (4.36 M vs 4.00 M at 64)
    block_c = block_c or default_block_c
    g = _num_programs(n, params.device, programs_per_sm)
    ts = torch.arange(step + 1, step + n_steps + 1, dtype=torch.float64)
    bc = torch.stack([1 - betas[0] ** ts, 1 - betas[1] ** ts], dim=1).to(device=params.device, dtype=torch.float32)
    act = active.to(torch.int8) if active is not None else loss  # any pointer when HAS_ACTIVE is off
    common = (n, c, spec.num_params, n_steps, lr, betas[0], betas[1], eps, float(spec.omega0),
              2.0 / (c * spec.out_dim), 1.0 / (c * spec.out_dim))
    if kernel == "regs":
        _fit_kernel_regs[(g,)](params, exp_avg, exp_avg_sq, loss, coords, target, act, bc, *common,
                               HAS_ACTIVE=active is not None, IN=spec.in_dim, INP=triton.next_power_of_2(spec.in_dim),
                               H=spec.hidden, HP=hp, NS=spec.hidden_layers, OUT=spec.out_dim,
                               OUTP=triton.next_power_of_2(spec.out_dim), BLOCK_C=block_c, PRECISION=dot_precision,
                               SINCOS=sincos, DEFER=bool(defer_sums), MOMENTS=moments, num_warps=num_warps)
        return loss
    grad = torch.empty(g, spec.num_params, device=params.device, dtype=torch.float32)
    scratch = torch.empty(g, 2 * spec.hidden_layers * block_c * hp, device=params.device, dtype=torch.float32)
    _fit_kernel[(g,)](params, exp_avg, exp_avg_sq, loss, coords, target, act, bc, grad, scratch, *common,
                      HAS_ACTIVE=active is not None, IN=spec.in_dim, H=spec.hidden, HP=hp, NS=spec.hidden_layers,
                      OUT=spec.out_dim, BLOCK_C=block_c, BLOCK_P=256, num_warps=num_warps)
    return loss
