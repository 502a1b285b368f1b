"""Batched SIREN: N independent fields, each its own flat weight vector, over one coordinate grid.

Layout of a field's flat parameter vector (the "flattening order"): for each layer in order, its
weight [out, in] row-major, then its bias [out]. Every sine layer computes sin(omega0 * (W h + b));
the last layer is linear.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


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
    """[N, P] weights, [C, in_dim] coordinates → [N, C, out_dim]; differentiable in `params`."""
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
                    n_steps=1, active=None, backend: str = "auto") -> torch.Tensor:
    """Fused fitting: forward, per-field MSE, backward and Adam, `n_steps` times. See the reference."""
    return siren_fit_steps_reference(params, exp_avg, exp_avg_sq, step, coords, target, spec, lr=lr, betas=betas,
                                     eps=eps, n_steps=n_steps, active=active)
