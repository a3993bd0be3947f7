"""Contract checks for objective plugins: ``check_objective_contract(MyObjective, margin=2.0)``.

An objective (see :class:`distill_plugins.Objective`) promises that

* it returns one finite fp32 loss per token row, ``[N]``;
* it is differentiable with respect to the student logits (finite gradient of
  the student's shape) and never gives the teacher logits a gradient;
* a row's loss depends only on that row: rows the loss glue drops (masked
  tokens) add nothing to the others, and calling it on a subset of rows gives
  the same values for those rows;
* padded vocabulary columns (at or past ``vocab_size``) change nothing and get
  zero gradient;
* a float temperature and a ``[N]`` tensor of the same values agree;
* TP=1 and TP=2 (the vocabulary split over two real gloo processes) agree in
  value and gradient;
* when it claims ``supports_fused_output_layer``: on the fused output layer
  (logits computed chunk by chunk from hidden states, a chunk size that does not
  divide the row count, per-token temperatures with ``tau**2`` row weights, some
  rows not kept) the loss and the gradients with respect to the hidden states and
  the output-layer weight equal the materialised path's, at TP=1 and TP=2
  (:func:`check_fused_contract`).

Usage in a plugin's test suite::

    from distill_plugins.testing.contracts import check_objective_contract

    def test_contract():
        check_objective_contract(MyObjective, margin=2.0)          # a class and its Config params
        check_objective_contract(MyObjective(MyObjective.Config()))  # or an instance

The TP=2 check spawns two processes (a few seconds); pass
``distributed=False`` to skip it. Failures raise ``AssertionError`` saying
which promise broke.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from distill_plugins.interfaces import Objective
from distill_plugins.objectives.fused import fused_output_layer_loss, replicated_input

__all__ = ["check_fused_contract", "check_nonfinite_contract", "check_objective_contract"]


def _build(cls_or_instance: Any, params: dict) -> Objective:
    if isinstance(cls_or_instance, Objective):
        if params:
            raise TypeError("pass parameters only with a class, not with an instance")
        return cls_or_instance
    if isinstance(cls_or_instance, type) and issubclass(cls_or_instance, Objective):
        return cls_or_instance(cls_or_instance.Config(**params))
    raise TypeError(f"expected an Objective subclass or instance, got {cls_or_instance!r}")


def _loss_and_grad(objective: Objective, s: torch.Tensor, t: torch.Tensor, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = objective(s, t, **kw)
    assert isinstance(loss, torch.Tensor), f"objective returned {type(loss).__name__}, not a tensor"
    assert loss.shape == (s.shape[0],), f"loss shape {tuple(loss.shape)}; expected [N] = [{s.shape[0]}]"
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}; expected torch.float32"
    assert bool(torch.isfinite(loss).all()), f"non-finite loss: {loss.tolist()}"
    assert loss.requires_grad, "loss does not require grad: it is not differentiable in student_logits"
    loss.sum().backward()
    assert s.grad is not None, "student_logits got no gradient"
    assert s.grad.shape == s.shape, f"gradient shape {tuple(s.grad.shape)} != student shape {tuple(s.shape)}"
    assert bool(torch.isfinite(s.grad).all()), "non-finite gradient"
    assert t.grad is None or not bool(t.grad.any()), "teacher_logits received a gradient"
    return loss.detach(), s.grad.detach()


def _close(x: torch.Tensor, y: torch.Tensor, atol: float, what: str) -> None:
    err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
    scale = max(1.0, y.double().abs().max().item() if y.numel() else 0.0)
    assert err <= atol * scale, f"{what}: max difference {err:.3g} > {atol * scale:.3g}"


def _tp_worker(rank: int, world_size: int, cls: type, config: Any, s: torch.Tensor, t: torch.Tensor,
               tau: torch.Tensor, vocab_size: Optional[int], fused_case: Optional[dict] = None):
    group = torch.distributed.group.WORLD
    v_local = s.shape[1] // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    objective = cls(config)
    loss, grad = _loss_and_grad(objective, s[:, cols], t[:, cols], temperature=tau, tp_group=group,
                                vocab_size=vocab_size)
    out = {"loss": loss, "grad": grad}
    if fused_case is not None:
        rows = fused_case["ws"].shape[0] // world_size
        shard = {k: (v[rank * rows:(rank + 1) * rows] if k in ("ws", "wt") else v) for k, v in fused_case.items()}
        out["fused"] = _fused_case_run(objective, shard, group, fused=True)
    return out


def _fused_case(n_rows: int, hidden: int, padded_vocab: int, vocab_size: int, chunk_rows: int, seed: int) -> dict:
    """Random hidden states, output-layer weights, per-token temperatures and a keep mask."""
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(n_rows, generator=gen) < 0.7
    keep[0] = True
    return {"hs": torch.randn(n_rows, hidden, generator=gen), "ht": torch.randn(n_rows, hidden + 3, generator=gen),
            "ws": torch.randn(padded_vocab, hidden, generator=gen), "wt": torch.randn(padded_vocab, hidden + 3,
                                                                                      generator=gen),
            "labels": torch.randint(0, vocab_size, (n_rows,), generator=gen), "keep": keep,
            "tau": 0.5 + torch.rand(int(keep.sum()), generator=gen), "vocab_size": vocab_size,
            "chunk_rows": chunk_rows}


def _fused_case_run(objective: Objective, case: dict, group: Any, *, fused: bool) -> dict:
    """``(loss, d/d hidden, d/d weight)`` of ``sum_kept tau_i**2 l_i``, fused or through materialised logits."""
    hs = case["hs"].detach().clone().requires_grad_(True)
    ws = case["ws"].detach().clone().requires_grad_(True)
    keep, tau = case["keep"], case["tau"]
    if fused:
        out = fused_output_layer_loss(hs, ws, case["ht"], case["wt"], case["labels"], objective, keep=keep,
                                      temperature=tau, scale_loss_by_tau_squared=True, tp_group=group,
                                      vocab_size=case["vocab_size"], chunk_rows=case["chunk_rows"])
        loss = out.loss
    else:
        zs = (replicated_input(hs, group) @ ws.t())[keep]
        zt = (case["ht"] @ case["wt"].t())[keep]
        per_row = objective(zs, zt, temperature=tau, tp_group=group, vocab_size=case["vocab_size"])
        loss = (per_row.float() * tau * tau).sum()
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}


def check_fused_contract(cls_or_instance: Any, *, distributed: bool = True, n_rows: int = 13, hidden: int = 8,
                         padded_vocab: int = 24, vocab_size: int = 21, chunk_rows: int = 4, seed: int = 0,
                         atol: float = 2e-5, **params: Any) -> None:
    """Check that an objective claiming ``supports_fused_output_layer`` keeps the fused row-chunk contract.

    The fused output layer (:func:`distill_plugins.objectives.fused.fused_output_layer_loss`, in
    chunks of ``chunk_rows`` rows, some rows not kept, per-token temperatures, each kept row's
    loss weighted by ``tau**2``) must give the materialised path's loss and gradients with respect
    to the student's hidden states and output-layer weight, at TP=1 and (``distributed``) TP=2.
    Row weights that differ per row catch an objective whose rows interact (a batch mean, say):
    such an objective cannot be chunked.

    Raises:
        AssertionError: naming the quantity that differs.
    """
    objective = _build(cls_or_instance, params)
    assert objective.supports_fused_output_layer, (
        f"{type(objective).__name__} does not set supports_fused_output_layer; nothing to check")
    if padded_vocab % 2 or not 0 < vocab_size <= padded_vocab:
        raise ValueError("padded_vocab must be even and vocab_size in [1, padded_vocab]")
    case = _fused_case(n_rows, hidden, padded_vocab, vocab_size, chunk_rows, seed)
    _check_fused_case(objective, case, atol, distributed)


def _check_fused_case(objective: Objective, case: dict, atol: float, distributed: bool,
                      tp_results: Optional[list] = None) -> None:
    expect = _fused_case_run(objective, case, None, fused=False)
    got = _fused_case_run(objective, case, None, fused=True)
    for key in ("loss", "grad_hidden", "grad_weight"):
        _close(got[key], expect[key], atol, f"fused output layer {key} differs from the materialised path "
                                            "(rows must be independent: the fused path calls the objective on "
                                            "row chunks)")
    if not distributed:
        return
    if tp_results is None:
        from distill_plugins.testing.distributed import run_distributed

        s = case["hs"] @ case["ws"].t()
        t = case["ht"] @ case["wt"].t()
        tau = torch.ones(s.shape[0])
        tp_results = run_distributed(_tp_worker, 2, args=(type(objective), objective.config, s, t, tau,
                                                          case["vocab_size"], case))
    for rank, res in enumerate(tp_results):
        fused = res["fused"]
        _close(fused["loss"], expect["loss"], atol, f"fused output layer at TP=2, rank {rank}: loss differs")
        _close(fused["grad_hidden"], expect["grad_hidden"], atol,
               f"fused output layer at TP=2, rank {rank}: gradient of the hidden states differs")
    tp_grad = torch.cat([res["fused"]["grad_weight"] for res in tp_results], dim=0)
    _close(tp_grad, expect["grad_weight"], atol, "fused output layer at TP=2: gradient of the weight differs")


def check_objective_contract(cls_or_instance: Any, *, distributed: bool = True, n_rows: int = 6,
                             padded_vocab: int = 24, vocab_size: int = 21, seed: int = 0, atol: float = 2e-5,
                             **params: Any) -> None:
    """Check that an objective keeps the :class:`~distill_plugins.Objective` contract.

    Args:
        cls_or_instance: an ``Objective`` subclass (built as ``cls(cls.Config(**params))``)
            or an instance.
        distributed: also compare TP=1 with TP=2 on two gloo processes (the class must be
            importable by name, i.e. defined at module level).
        n_rows, padded_vocab, vocab_size: test shape; ``padded_vocab`` must be even.
        seed: RNG seed of the random logits.
        atol: tolerance, relative to max(1, magnitude of the expected value).
        **params: the objective's ``Config`` fields.

    Raises:
        AssertionError: naming the broken promise.
    """
    objective = _build(cls_or_instance, params)
    if padded_vocab % 2 or not 0 < vocab_size <= padded_vocab:
        raise ValueError("padded_vocab must be even and vocab_size in [1, padded_vocab]")
    gen = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(n_rows, padded_vocab, generator=gen)
    t = 2.0 * torch.randn(n_rows, padded_vocab, generator=gen)
    tau = 0.5 + torch.rand(n_rows, generator=gen)
    kw = dict(temperature=tau, vocab_size=vocab_size)

    loss, grad = _loss_and_grad(objective, s, t, **kw)

    # Rows are independent: a subset of rows gives the same values, and a row's
    # gradient lands on that row only.
    keep = torch.arange(0, n_rows, 2)
    sub_loss, sub_grad = _loss_and_grad(objective, s[keep], t[keep], temperature=tau[keep], vocab_size=vocab_size)
    _close(sub_loss, loss[keep], atol, "loss of a subset of rows differs from the same rows in the full call "
                                       "(a row's loss must depend on that row only)")
    _close(sub_grad, grad[keep], atol, "gradient of a subset of rows differs from the full call")
    s_row = s.detach().clone().requires_grad_(True)
    objective(s_row, t, **kw)[0].backward()
    assert not bool(s_row.grad[1:].any()), "the loss of row 0 has a gradient on other rows"
    s_perturbed = s.clone()
    s_perturbed[1:] += torch.randn(n_rows - 1, padded_vocab, generator=gen)
    with torch.no_grad():
        moved = objective(s_perturbed, t, **kw)
    _close(moved[:1], loss[:1], atol, "changing other rows changed row 0's loss")

    # Padded columns carry nothing.
    if vocab_size < padded_vocab:
        s_pad, t_pad = s.clone(), t.clone()
        s_pad[:, vocab_size:] = 50.0 * torch.randn(n_rows, padded_vocab - vocab_size, generator=gen)
        t_pad[:, vocab_size:] = float("-inf")
        pad_loss, pad_grad = _loss_and_grad(objective, s_pad, t_pad, **kw)
        _close(pad_loss, loss, atol, "values in padded columns (>= vocab_size) changed the loss")
        assert not bool(pad_grad[:, vocab_size:].any()), "padded columns received a gradient"

    # A float temperature equals a tensor of that value.
    f_loss, f_grad = _loss_and_grad(objective, s, t, temperature=1.5, vocab_size=vocab_size)
    t_loss, t_grad = _loss_and_grad(objective, s, t, temperature=torch.full((n_rows,), 1.5), vocab_size=vocab_size)
    _close(f_loss, t_loss, atol, "float temperature and [N] tensor temperature disagree")
    _close(f_grad, t_grad, atol, "float temperature and [N] tensor temperature disagree (gradient)")

    fused_case = None
    if objective.supports_fused_output_layer:
        fused_case = _fused_case(n_rows + 7, 8, padded_vocab, vocab_size, 4, seed)
        _check_fused_case(objective, fused_case, atol, distributed=False)

    if distributed:
        from distill_plugins.testing.distributed import run_distributed

        results = run_distributed(_tp_worker, 2, args=(type(objective), objective.config, s, t, tau, vocab_size,
                                                       fused_case))
        for rank, res in enumerate(results):
            _close(res["loss"], loss, atol, f"TP=2 loss on rank {rank} differs from TP=1")
        tp_grad = torch.cat([res["grad"] for res in results], dim=1)
        _close(tp_grad, grad, atol, "TP=2 gradient differs from TP=1")
        if fused_case is not None:
            _check_fused_case(objective, fused_case, atol, distributed=True, tp_results=results)


# ---------------------------------------------------------------------------
# Non-finite inputs (every objective)
# ---------------------------------------------------------------------------

#: the cases of :func:`check_nonfinite_contract` that must raise ``InputError``: (name, side, fill, message)
_NONFINITE_ERRORS = (
    ("NaN in the student", "student", "nan", "student_logits contains NaN"),
    ("NaN in the teacher", "teacher", "nan", "teacher_logits contains NaN"),
    ("+inf in the student", "student", "inf", "student_logits contains +inf"),
    ("+inf in the teacher", "teacher", "inf", "teacher_logits contains +inf"),
    ("a student row that is -inf in every real column", "student", "row", "student_logits row"),
    ("a teacher row that is -inf in every real column", "teacher", "row", "teacher_logits row"),
)


def _poison(s: torch.Tensor, t: torch.Tensor, side: str, fill: str, row: int, col: int, width: int):
    s, t = s.clone(), t.clone()
    x = s if side == "student" else t
    if fill == "row":
        x[row, :width] = float("-inf")
    else:
        x[row, col] = float(fill)
    return s, t


def _nonfinite_tp_worker(rank: int, world_size: int, items: list, s: torch.Tensor, t: torch.Tensor,
                         vocab_size: int, row: int, col: int):
    """For each ``(cls, config)``: every raising case with the bad value in rank 1's shard only -> messages per rank."""
    from distill_plugins.errors import InputError

    group = torch.distributed.group.WORLD
    v_local = s.shape[1] // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    out = []
    for cls, config in items:
        objective = cls(config)
        seen = {}
        for name, side, fill, _ in _NONFINITE_ERRORS:
            bs, bt = _poison(s, t, side, fill, row, col, vocab_size)
            try:
                objective(bs[:, cols].requires_grad_(True), bt[:, cols], tp_group=group, vocab_size=vocab_size)
                seen[name] = None
            except InputError as exc:
                seen[name] = str(exc)
        out.append(seen)
    return out


def check_nonfinite_contract(cls_or_instance: Any, *, distributed: bool = True, n_rows: int = 5,
                             padded_vocab: int = 24, vocab_size: int = 21, seed: int = 0, **params: Any) -> None:
    """Check the non-finite-input contract every objective keeps (docs/objectives.md, "The call contract").

    With ``x`` the real columns (``< vocab_size``) of a row:

    * NaN or ``+inf`` anywhere in ``x`` of either tensor, or a row whose ``x`` is all
      ``-inf``, raises :class:`~distill_plugins.errors.InputError` naming the tensor
      (``"student_logits contains NaN"``, ``"teacher_logits contains +inf"``,
      ``"teacher_logits row 2 is -inf in every real vocabulary column"``); with
      ``distributed``, when the bad value sits in one TP rank's shard only, *every*
      rank raises (none waits in a collective);
    * ``-inf`` in the same column of both tensors (a token both models exclude)
      gives a finite loss and a finite gradient;
    * ``-inf`` in one tensor only gives, in that row, a finite loss or ``+inf`` (the
      divergence really is infinite), never NaN; the other rows keep their values and
      finite gradients.

    Args:
        cls_or_instance: an ``Objective`` subclass (built with ``**params``) or an instance.
        distributed: also run the raising cases at TP=2 with the bad value on rank 1 only
            (two gloo processes; the class must be importable by name).
        n_rows, padded_vocab, vocab_size, seed: test shape and RNG seed (``vocab_size > padded_vocab // 2``
            so that rank 1 of TP=2 holds real columns).

    Raises:
        AssertionError: naming the case that broke the contract.
    """
    from distill_plugins.errors import InputError

    objective = _build(cls_or_instance, params)
    if padded_vocab % 2 or not padded_vocab // 2 < vocab_size <= padded_vocab or n_rows < 3:
        raise ValueError("need padded_vocab even, padded_vocab/2 < vocab_size <= padded_vocab and n_rows >= 3")
    gen = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(n_rows, padded_vocab, generator=gen)
    t = 2.0 * torch.randn(n_rows, padded_vocab, generator=gen)
    row, col = 1, vocab_size - 2  # a real column in the second half: rank 1's shard at TP=2
    label = type(objective).__name__

    for name, side, fill, message in _NONFINITE_ERRORS:
        bs, bt = _poison(s, t, side, fill, row, col, vocab_size)
        try:
            objective(bs.requires_grad_(True), bt, vocab_size=vocab_size)
        except InputError as exc:
            assert message in str(exc), f"{label}: {name} raised InputError without naming it: {exc}"
        else:
            raise AssertionError(f"{label}: {name} did not raise InputError (expected a message with {message!r})")

    base, _ = _loss_and_grad(objective, s, t, vocab_size=vocab_size)
    others = torch.arange(n_rows) != row
    cases = {"-inf in the same column of both tensors": ("both",), "-inf in the student only": ("student",),
             "-inf in the teacher only": ("teacher",)}
    for name, sides in cases.items():
        bs, bt = s.clone(), t.clone()
        for side in ("student", "teacher") if sides == ("both",) else sides:
            (bs if side == "student" else bt)[row, col] = float("-inf")
        x = bs.clone().requires_grad_(True)
        loss = objective(x, bt, vocab_size=vocab_size)
        assert not bool(torch.isnan(loss).any()), f"{label}: {name} gave a NaN loss {loss.tolist()} (finite or +inf)"
        _close(loss[others].detach(), base[others], 2e-5, f"{label}: {name} changed the loss of other rows")
        finite = torch.isfinite(loss.detach())
        if sides == ("both",):
            assert bool(finite.all()), f"{label}: {name} gave a non-finite loss {loss.tolist()}"
        if bool(finite.any()):
            loss[finite].sum().backward()
            keep = finite.clone()
            assert bool(torch.isfinite(x.grad[keep]).all()), f"{label}: {name} gave a non-finite gradient"

    if distributed:
        from distill_plugins.testing.distributed import run_distributed

        results = run_distributed(_nonfinite_tp_worker, 2, timeout=300,
                                  args=([(type(objective), objective.config)], s, t, vocab_size, row, col))
        for rank, per_rank in enumerate(results):
            for name, side, fill, message in _NONFINITE_ERRORS:
                got = per_rank[0][name]
                assert got is not None and message in got, (
                    f"{label}: at TP=2 with {name} on rank 1's shard only, rank {rank} "
                    f"{'did not raise' if got is None else 'raised ' + repr(got)}")
