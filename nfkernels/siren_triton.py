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
            f64 = tl.cast(f, tl.int64)
            pf = p_ptr + f64 * P
            mf = m_ptr + f64 * P
            vf = v_ptr + f64 * P
            yf = y_ptr + f64 * C * OUT
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


def _num_programs(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n, 8 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n, 16)  # the interpreter runs programs one after another


def siren_fit_steps(params, exp_avg, exp_avg_sq, step, coords, target, spec, *, lr, betas, eps, n_steps,
                    active) -> torch.Tensor:
    """In-place fused fit on contiguous float32 [N, P] buffers; target [N, C, out_dim]; returns loss [N]."""
    n, c = params.shape[0], coords.shape[0]
    loss = torch.zeros(n, device=params.device, dtype=torch.float32)
    if n == 0 or c == 0:
        return loss
    hp, block_c = _launch_shape(spec)
    g = _num_programs(n, params.device)
    ts = torch.arange(step + 1, step + n_steps + 1, dtype=torch.float64)
    bc = torch.stack([1 - betas[0] ** ts, 1 - betas[1] ** ts], dim=1).to(device=params.device, dtype=torch.float32)
    grad = torch.empty(g, spec.num_params, device=params.device, dtype=torch.float32)
    scratch = torch.empty(g, 2 * spec.hidden_layers * block_c * hp, device=params.device, dtype=torch.float32)
    act = active.to(torch.int8) if active is not None else loss  # any pointer when HAS_ACTIVE is off
    _fit_kernel[(g,)](params, exp_avg, exp_avg_sq, loss, coords, target, act, bc, grad, scratch,
                      n, c, spec.num_params, n_steps, lr, betas[0], betas[1], eps, float(spec.omega0),
                      2.0 / (c * spec.out_dim), 1.0 / (c * spec.out_dim),
                      HAS_ACTIVE=active is not None, IN=spec.in_dim, H=spec.hidden, HP=hp, NS=spec.hidden_layers,
                      OUT=spec.out_dim, BLOCK_C=block_c, BLOCK_P=256, num_warps=4)
    return loss
