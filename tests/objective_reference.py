"""Dense fp64 reference implementations of the built-in objectives (plain torch on the full vocabulary).

Written from the formulas in docs/objectives.md, independently of the fused
kernels: log-softmax on the real columns, explicit sums, and CSD in its O(V^2)
pair form. Used by the objective tests; not collected by pytest.
"""

from __future__ import annotations

import torch

#: (registry name, params) pairs the tests cover; every registered name appears.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("jsd", {"beta": 0.2}),
    ("tvd", {}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.7}),
    ("logit_mse", {}),
    ("logit_mse", {"weight": "S", "weight_temperature": 2.0}),
    ("logit_mse", {"weight": "T"}),
    *[("csd", {"w1": w1, "w2": w2}) for w1 in "UST" for w2 in "UST"],
    ("csd", {"w1": "S", "w2": "S", "weight_temperature": 1.5}),
    ("csd", {"w1": "U", "w2": "S", "weight_temperature": 0.7}),
]


def case_id(name: str, params: dict) -> str:
    return name + "".join(f"-{k}={v}" for k, v in sorted(params.items()))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row with 0 log 0 = 0."""
    p = logp.exp()
    mask = p > 0  # mask the logs too, so that autograd sees no 0 * inf either
    zero = torch.zeros_like(p)
    return (p * (torch.where(mask, logp, zero) - torch.where(mask, logq, zero))).sum(-1)


def csd_weights(kind: str, a: torch.Tensor, b: torch.Tensor, weight_temperature: float) -> torch.Tensor:
    """Detached CSD / DLD weights over the real columns."""
    if kind == "U":
        return torch.full_like(a, 1.0 / a.shape[-1])
    if kind == "S":
        return torch.softmax(a.detach() / weight_temperature, dim=-1)
    return torch.softmax(b.detach(), dim=-1)


def csd_pair_form(a: torch.Tensor, b: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """1/2 sum_y sum_x w1(y) w2(x) (d[x] - d[y])^2, O(V^2) per row."""
    d = a - b
    pair = (d.unsqueeze(-2) - d.unsqueeze(-1)) ** 2  # [N, y, x]
    return 0.5 * (w1.unsqueeze(-1) * w2.unsqueeze(-2) * pair).sum((-1, -2))


def reference_loss(name: str, params: dict, s: torch.Tensor, t: torch.Tensor, tau, vocab_size: int) -> torch.Tensor:
    """Per-token fp64 loss of objective ``name`` on full (unsharded, padded) logits ``[N, V_padded]``."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    tau = tau.expand(s.shape[0]) if tau.dim() == 0 else tau
    a = s[:, :vocab_size].double() / tau.unsqueeze(-1)
    b = t[:, :vocab_size].double() / tau.unsqueeze(-1)
    logq, logp = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    q, p = logq.exp(), logp.exp()
    if name == "forward_kl":
        return _kl(logp, logq)
    if name == "reverse_kl":
        return _kl(logq, logp)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        if beta == 0.0:
            return _kl(logp, logq)
        if beta == 1.0:
            return _kl(logq, logp)
        logm = torch.log(beta * p + (1 - beta) * q)
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(logp, torch.log(alpha * p + (1 - alpha) * q))
    if name == "skew_reverse_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(logq, torch.log((1 - alpha) * p + alpha * q))
    if name == "logit_mse":
        kind, wt = params.get("weight", "U"), params.get("weight_temperature", 1.0)
        if kind == "U":
            w = torch.full_like(a, 1.0 / vocab_size)
        else:
            w = torch.softmax((a if kind == "S" else b).detach() / wt, dim=-1)
        return 0.5 * (w * (a - b) ** 2).sum(-1)
    if name == "csd":
        wt = params.get("weight_temperature", 1.0)
        w1 = csd_weights(params.get("w1", "S"), a, b, wt)
        w2 = csd_weights(params.get("w2", "S"), a, b, wt)
        return csd_pair_form(a, b, w1, w2)
    raise KeyError(name)


def reference_loss_and_grad(name, params, s, t, tau, vocab_size):
    """``(loss [N] fp64, d sum(loss) / d s [N, V_padded] fp64)``."""
    s64 = s.detach().double().requires_grad_(True)
    loss = reference_loss(name, params, s64, t.detach().double(), tau, vocab_size)
    (grad,) = torch.autograd.grad(loss.sum(), s64)
    return loss.detach(), grad
