"""Batched SIREN: N independent fields, each its own flat weight vector, over one coordinate grid.

Layout of a field's flat parameter vector (the "flattening order"): for each layer in order, its
weight [out, in] row-major, then its bias [out]. Every sine layer computes sin(omega0 * (W h + b));
the last layer is linear.

Backends of siren_forward / siren_fit_steps (``backend=``): ``torch`` (the references below), ``cpp``
(csrc/siren_cpu.cpp: torch.ops.nfkernels.siren_forward / siren_backward / siren_fit_steps, CPU float32,
any widths) and ``triton`` (nfkernels/siren_triton.py: CUDA, or CPU under TRITON_INTERPRET=1; float32,
widths ≤ 128). ``auto`` takes cpp on CPU and triton on CUDA, and the reference for float64 or shapes the
fast kernel does not take.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nfkernels._ext import has_op, resolve_backend


@dataclass(frozen=True)
class SirenSpec:
    in_dim: int = 2
    hidden: int = 32
    hidden_layers: int = 2  # number of sine layers; the default 2→32→32→1 has two
    out_dim: int = 1
    omega0: float = 30.0

    def __post_init__(self):
        if self.in_dim < 1 or self.out_dim < 1 or self.hidden < 1 or self.hidden_layers < 1:
            raise ValueError(f"invalid SIREN shape {self}")
        if not (self.omega0 > 0 and math.isfinite(self.omega0)):
            raise ValueError(f"omega0 must be positive and finite, got {self.omega0}")

    @property
    def layer_dims(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of every linear layer, first to last."""
        dims = [self.in_dim] + [self.hidden] * self.hidden_layers + [self.out_dim]
        return list(zip(dims[:-1], dims[1:]))

    @property
    def num_params(self) -> int:
        return sum(i * o + o for i, o in self.layer_dims)

    def param_layout(self) -> list[dict]:
        """The flattening order: one entry per tensor with its name, shape and offset."""
        out, off = [], 0
        for li, (fi, fo) in enumerate(self.layer_dims):
            for kind, shape in (("weight", [fo, fi]), ("bias", [fo])):
                n = math.prod(shape)
                out.append({"layer": li, "kind": kind, "shape": shape, "offset": off, "numel": n})
                off += n
        return out

    def unflatten(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[N, P] → per layer (W [N, out, in], b [N, out]), as views."""
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(f"params must be [N, {self.num_params}] for {self}, got {tuple(params.shape)}")
        layers, off = [], 0
        for fi, fo in self.layer_dims:
            w = params[:, off:off + fo * fi].view(-1, fo, fi)
            off += fo * fi
            b = params[:, off:off + fo]
            off += fo
            layers.append((w, b))
        return layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SirenSpec":
        return cls(**{k: d[k] for k in ("in_dim", "hidden", "hidden_layers", "out_dim", "omega0")})


def coord_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel-centre-free [-1, 1] grid (linspace including both ends), row-major: [prod(shape), len(shape)]."""
    axes = [torch.linspace(-1.0, 1.0, s, device=device, dtype=dtype) for s in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, len(shape))


def siren_init(spec: SirenSpec, n: int, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32) -> torch.Tensor:
    """SIREN init for n fields: first layer U(±1/fan_in), later layers U(±sqrt(6/fan_in)/omega0).

    Biases use the same bound as their layer's weights. Returns [n, P].
    """
    chunks = []
    for li, (fi, fo) in enumerate(spec.layer_dims):
        bound = 1.0 / fi if li == 0 else math.sqrt(6.0 / fi) / spec.omega0
        for numel in (fo * fi, fo):
            u = torch.rand(n, numel, generator=generator, dtype=torch.float64)
            chunks.append((u * 2 - 1) * bound)
    return torch.cat(chunks, dim=1).to(device=device, dtype=dtype)


def siren_forward_reference(params: torch.Tensor, coords: torch.Tensor, spec: SirenSpec) -> torch.Tensor:
    """Obviously-correct batched forward: [N, P], [C, in_dim] → [N, C, out_dim]."""
    if coords.dim() != 2 or coords.shape[1] != spec.in_dim:
        raise ValueError(f"coords must be [C, {spec.in_dim}], got {tuple(coords.shape)}")
    layers = spec.unflatten(params)
    h = coords.unsqueeze(0).expand(params.shape[0], -1, -1)
    for li, (w, b) in enumerate(layers):
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if li < len(layers) - 1:
            h = torch.sin(spec.omega0 * h)
    return h


def siren_forward(params: torch.Tensor, coords: torch.Tensor, spec: SirenSpec, backend: str = "auto") -> torch.Tensor:
    """[N, P] weights, [C, in_dim] coordinates → [N, C, out_dim]; differentiable in `params`.

    Backends: ``cpp`` (CPU, float32), ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1; float32, hidden
    ≤ 128), ``torch`` (the reference). ``auto`` falls back to ``torch`` for shapes/dtypes the fast ones
    do not take.
    """
    b = _pick(backend, params, coords, spec, "siren_forward")
    if b == "cpp":
        return torch.ops.nfkernels.siren_forward(params, coords, _dims(spec), spec.omega0)
    if b == "triton":
        from nfkernels import siren_triton

        return siren_triton.siren_forward(params, coords, spec)
    return siren_forward_reference(params, coords, spec)


def siren_fit_steps_reference(params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                              coords: torch.Tensor, target: torch.Tensor, spec: SirenSpec, *, lr: float,
                              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, n_steps: int = 1,
                              active: torch.Tensor | None = None) -> torch.Tensor:
    """`n_steps` Adam steps on every field at once, in place; returns the per-field MSE [N] of the last step.

    Loss = sum over fields of each field's mean squared error, so a field's gradient does not depend on
    N. The Adam update is torch.optim.Adam's (bias-corrected, no weight decay); `step` is the number of
    steps already taken (0 before the first). Fields with active[i] == False are left untouched.
    """
    b1, b2 = betas
    loss = None
    for s in range(n_steps):
        p = params.detach().requires_grad_(True)
        err = siren_forward_reference(p, coords, spec) - target
        per_field = err.pow(2).mean(dim=(1, 2))
        (grad,) = torch.autograd.grad(per_field.sum(), p)
        t = step + s + 1
        with torch.no_grad():
            m = exp_avg.mul(b1).add_(grad, alpha=1 - b1)
            v = exp_avg_sq.mul(b2).addcmul_(grad, grad, value=1 - b2)
            upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) * lr
            if active is None:
                exp_avg.copy_(m), exp_avg_sq.copy_(v), params.sub_(upd)
            else:
                keep = active.view(-1, 1)
                exp_avg.copy_(torch.where(keep, m, exp_avg))
                exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
                params.sub_(torch.where(keep, upd, torch.zeros_like(upd)))
        loss = per_field.detach()
    return loss


def siren_fit_steps(params, exp_avg, exp_avg_sq, step, coords, target, spec, *, lr, betas=(0.9, 0.999), eps=1e-8,
                    n_steps=1, active=None, backend: str = "auto", dot_precision: str = "ieee") -> torch.Tensor:
    """Fused fitting: forward, per-field MSE, backward and Adam, `n_steps` times, in place. See the reference.

    `target` is [N, C, out_dim] (or broadcastable to it); `active` an optional bool [N]. The fused
    backends keep each field's weights, Adam state and image on chip (Triton) or in cache (C++) across
    all `n_steps`. `dot_precision` ("ieee", "tf32", "tf32x3") sets the Triton kernel's hidden×hidden
    products; the other backends are always exact fp32.
    """
    b = _pick(backend, params, coords, spec, "siren_fit_steps")
    if b == "torch":
        return siren_fit_steps_reference(params, exp_avg, exp_avg_sq, step, coords, target, spec, lr=lr, betas=betas,
                                         eps=eps, n_steps=n_steps, active=active)
    n, c = params.shape[0], coords.shape[0]
    if n_steps < 1 or step < 0:
        raise ValueError(f"need n_steps >= 1 and step >= 0, got n_steps={n_steps}, step={step}")
    try:
        target = target.to(torch.float32).expand(n, c, spec.out_dim).contiguous()
    except RuntimeError:
        raise ValueError(f"target must be [N, C, out_dim] = [{n}, {c}, {spec.out_dim}], got {tuple(target.shape)}") from None
    if active is not None:
        if active.numel() != n:
            raise ValueError(f"active must be a bool mask of {n} fields, got shape {tuple(active.shape)}")
        active = active.reshape(n).to(device=params.device, dtype=torch.bool)
    # The kernels update contiguous buffers in place; work on copies and write back where the caller's aren't.
    state = [t if t.is_contiguous() else t.contiguous() for t in (params, exp_avg, exp_avg_sq)]
    if b == "cpp":
        loss = torch.ops.nfkernels.siren_fit_steps(*state, coords.contiguous(), target, active, _dims(spec),
                                                   spec.omega0, int(step), int(n_steps), float(lr), float(betas[0]),
                                                   float(betas[1]), float(eps))
    else:
        from nfkernels import siren_triton

        loss = siren_triton.siren_fit_steps(*state, int(step), coords.contiguous(), target, spec, lr=float(lr),
                                            betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                                            n_steps=int(n_steps), active=active, dot_precision=dot_precision)
    for mine, theirs in zip(state, (params, exp_avg, exp_avg_sq)):
        if mine is not theirs:
            theirs.copy_(mine)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and the compiled op's autograd


def _dims(spec: SirenSpec) -> list[int]:
    return [spec.in_dim] + [spec.hidden] * spec.hidden_layers + [spec.out_dim]


def _pick(backend: str, params: torch.Tensor, coords: torch.Tensor, spec: SirenSpec, op: str) -> str:
    """resolve_backend, then (for auto) drop to torch where the fast kernels do not take the inputs."""
    if params.dim() != 2 or params.shape[1] != spec.num_params:
        raise ValueError(f"params must be [N, {spec.num_params}] for {spec}, got {tuple(params.shape)}")
    if coords.dim() != 2 or coords.shape[1] != spec.in_dim:
        raise ValueError(f"coords must be [C, {spec.in_dim}], got {tuple(coords.shape)}")
    if coords.device != params.device:
        raise ValueError(f"params are on {params.device} but coords on {coords.device}")
    from nfkernels import siren_triton

    b = resolve_backend(backend, params.device, op, cpp=True, cuda=False, triton=True)
    why_not = None
    if b != "torch" and (params.dtype != torch.float32 or coords.dtype != torch.float32):
        why_not = "the fast kernels take float32 only"
    elif b == "triton" and not siren_triton.supports(spec):
        why_not = f"the Triton kernels take widths up to {siren_triton.MAX_WIDTH}"
    if why_not is None:
        return b
    if backend == "auto":
        return "torch"
    raise ValueError(f"backend {backend!r} cannot run {op} for {spec} with {params.dtype}: {why_not}; use backend='auto'")


def _register_autograd() -> None:
    if not has_op("siren_forward"):
        return

    def setup_context(ctx, inputs, output):
        params, coords, dims, omega0 = inputs
        ctx.save_for_backward(params, coords)
        ctx.dims, ctx.omega0 = dims, omega0

    def backward(ctx, grad_out):
        params, coords = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.nfkernels.siren_backward(grad_out.contiguous(), params, coords, ctx.dims, ctx.omega0)
        return grad, None, None, None

    torch.library.register_autograd("nfkernels::siren_forward", backward, setup_context=setup_context)

    # Shapes only, so that torch.compile can trace code that calls the ops.
    @torch.library.register_fake("nfkernels::siren_forward")
    def _(params, coords, dims, omega0):
        return params.new_empty(params.shape[0], coords.shape[0], dims[-1])

    @torch.library.register_fake("nfkernels::siren_backward")
    def _(grad_out, params, coords, dims, omega0):
        return torch.empty_like(params)

    @torch.library.register_fake("nfkernels::siren_fit_steps")
    def _(params, exp_avg, exp_avg_sq, coords, target, active, dims, omega0, step, n_steps, lr, beta1, beta2, eps):
        return params.new_empty(params.shape[0])


_register_autograd()
