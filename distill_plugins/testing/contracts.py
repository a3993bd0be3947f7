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

The other kinds of part have their checkers too (each documented below and in
docs/writing_plugins.md): :func:`check_nonfinite_contract` (an objective's answer
to NaN and ``±inf`` logits), :func:`check_selector_contract` (Selection types,
TP-identical keep masks, data-parallel consistency of the state, state round
trip), :func:`check_temperature_contract` (shape, detachment, TP agreement, state)
and :func:`check_aligner_contract` (the declared interface; for loss-computing
aligners a token sum over pairs, gradients, padding, TP=1 equals TP=2).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import (AlignerInputs, AlignerOutput, Objective, Selection, StepStats, TemperaturePolicy,
                                        TokenContext, TokenSelector, VocabAligner)
from distill_plugins.manager import build_plugin_host
from distill_plugins.objectives.fused import TOKEN_STATS, fused_output_layer_loss, replicated_input
from distill_plugins.testing.distributed import run_distributed

__all__ = ["check_aligner_contract", "check_fused_contract", "check_nonfinite_contract", "check_objective_contract",
           "check_selector_contract", "check_temperature_contract"]


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
    objective = _build_part(cls_or_instance, Objective, params)
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
    objective = _build_part(cls_or_instance, Objective, params)
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
    objective = _build_part(cls_or_instance, Objective, params)
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
        results = run_distributed(_nonfinite_tp_worker, 2, timeout=300,
                                  args=([(type(objective), objective.config)], s, t, vocab_size, row, col))
        for rank, per_rank in enumerate(results):
            for name, side, fill, message in _NONFINITE_ERRORS:
                got = per_rank[0][name]
                assert got is not None and message in got, (
                    f"{label}: at TP=2 with {name} on rank 1's shard only, rank {rank} "
                    f"{'did not raise' if got is None else 'raised ' + repr(got)}")


# ---------------------------------------------------------------------------
# Token selectors and temperature policies
# ---------------------------------------------------------------------------

#: DP-reduced losses fed to ``on_optimizer_step`` by the state checks (falling, with bumps).
_STEP_LOSSES = (2.0, 1.5, 1.6, 1.1, 1.15, 0.8, 0.95, 0.7, 0.72, 0.6)


def _build_part(cls_or_instance: Any, base: type, params: dict) -> Any:
    """``cls_or_instance`` itself, or the class built from ``Config(**params)``; a part of kind ``base``."""
    if isinstance(cls_or_instance, base):
        if params:
            raise TypeError("pass parameters only with a class, not with an instance")
        return cls_or_instance
    if isinstance(cls_or_instance, type) and issubclass(cls_or_instance, base):
        return cls_or_instance(cls_or_instance.Config(**params))
    raise TypeError(f"expected a subclass or an instance of {base.__name__}, got {cls_or_instance!r}")


def _fresh(part: Any) -> Any:
    """A new instance of ``part``'s class with the same config (the state of a part never trained)."""
    new = type(part)(part.config)
    new.name = part.name
    return new


def _is_plain(value: Any) -> bool:
    """Plain Python data (what checkpoints hold for parts): None, bool, int, float, str, lists and str-keyed dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _token_problem(n_rows: int, padded_vocab: int, seed: int) -> dict:
    """Random student/teacher/reference logits ``[N, V_pad]`` (student clearly closer on some rows) and labels."""
    gen = torch.Generator().manual_seed(seed)
    t = 2.0 * torch.randn(n_rows, padded_vocab, generator=gen)
    closeness = torch.linspace(0.1, 3.0, n_rows).unsqueeze(1)  # a spread of difficulties: no ties in scores
    s = t + closeness * torch.randn(n_rows, padded_vocab, generator=gen)
    ref = t + 0.5 * closeness.flip(0) * torch.randn(n_rows, padded_vocab, generator=gen)
    labels = torch.randint(0, padded_vocab, (n_rows,), generator=gen)
    return {"s": s, "t": t, "ref": ref, "labels": labels}


def _token_context(problem: dict, *, vocab_size: int, step: int, total_steps: int, group: Any = None,
                   cols: Optional[slice] = None, rows: Optional[torch.Tensor] = None, padding: Optional[float] = None):
    def take(x):
        x = x if rows is None else x[rows]
        x = x if cols is None else x[:, cols]
        return x.clone()

    s, t, ref = take(problem["s"]), take(problem["t"]), take(problem["ref"])
    if padding is not None:  # junk in the padded columns (global ids >= vocab_size) must change nothing
        start = 0 if cols is None else cols.start
        pad = torch.arange(start, start + s.shape[1]) >= vocab_size
        s[:, pad], t[:, pad], ref[:, pad] = padding, -padding, padding
    labels = problem["labels"] if rows is None else problem["labels"][rows]
    return TokenContext(student_logits=s.requires_grad_(True), teacher_logits=t, tp_group=group,
                        vocab_size=vocab_size, labels=labels.clone() % vocab_size, reference_logits=ref,
                        step=step, total_steps=total_steps)


def _check_fused_stats(part: Any, label: str) -> None:
    names = part.fused_token_stats()
    assert names is None or (isinstance(names, tuple) and all(n in TOKEN_STATS for n in names)), (
        f"{label}.fused_token_stats() returned {names!r}; expected None or a tuple of names from {TOKEN_STATS}")


def _check_state(part: Any, label: str, run: Any, ctx_of: Any) -> None:
    """State round trip and DP consistency; ``run(part, ctx)`` gives the comparable output of one call.

    ``ctx_of(step, data_seed)`` builds a context of optimizer step ``step`` on data ``data_seed``.
    """
    total = len(_STEP_LOSSES) + 2

    def stats(k: int) -> StepStats:
        return StepStats(step=k + 1, total_steps=total, kd_loss=_STEP_LOSSES[k], extras={"kept_fraction": 0.75})

    # DP consistency: two data-parallel ranks see different data but the same DP-reduced step figures
    ranks = [_fresh(part), _fresh(part)]
    for k in range(len(_STEP_LOSSES)):
        for data_seed, p in enumerate(ranks):
            run(p, ctx_of(k, 100 + data_seed))
            run(p, ctx_of(k, 200 + data_seed))  # two microbatches per step
        for p in ranks:
            p.on_optimizer_step(stats(k))
    state = ranks[0].state_dict()
    assert isinstance(state, dict) and _is_plain(state), (
        f"{label}.state_dict() must return plain Python data (dict of numbers, strings, lists, None), got {state!r}")
    assert ranks[1].state_dict() == state, (
        f"{label}: two data-parallel ranks that saw different batches but the same on_optimizer_step figures hold "
        f"different state ({state!r} vs {ranks[1].state_dict()!r}); state may depend only on StepStats")
    probe = ctx_of(len(_STEP_LOSSES), 7)
    a, b = run(ranks[0], probe), run(ranks[1], probe)
    assert _equal(a, b), f"{label}: data-parallel ranks with the same state disagree on the same batch"

    # round trip: a fresh part loaded with the state behaves like the original, now and after another step
    # (a checkpoint is taken between optimizer steps: the probe is the first call of a new step for both)
    restored = _fresh(part)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state, f"{label}: load_state_dict(state_dict()) does not restore the state"
    probe = ctx_of(len(_STEP_LOSSES) + 1, 8)
    assert _equal(run(ranks[0], probe), run(restored, probe)), (
        f"{label}: a part restored from state_dict() gives other results than the original")
    ranks[0].on_optimizer_step(stats(len(_STEP_LOSSES) - 1))
    restored.on_optimizer_step(stats(len(_STEP_LOSSES) - 1))
    assert restored.state_dict() == ranks[0].state_dict(), (
        f"{label}: after one more on_optimizer_step the restored part's state differs from the original's")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _select(selector: Any, ctx: Any) -> tuple:
    sel = selector.select(ctx)
    assert isinstance(sel, Selection), f"select() returned {type(sel).__name__}, not distill_plugins.Selection"
    return (sel.keep, sel.normalize_by, sel.scores)


def _check_selection(selector: Any, ctx: Any, label: str) -> tuple:
    n = ctx.student_logits.shape[0]
    keep, normalize_by, scores = _select(selector, ctx)
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.shape == (n,), (
        f"{label}: Selection.keep must be a bool tensor [N] = [{n}], got "
        f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
    assert keep.device == ctx.student_logits.device, f"{label}: keep is on {keep.device}, the logits on " \
                                                     f"{ctx.student_logits.device}"
    assert normalize_by in ("kept", "all"), f"{label}: normalize_by={normalize_by!r} is not 'kept' or 'all'"
    if scores is not None:
        assert isinstance(scores, torch.Tensor) and scores.shape == (n,) and scores.dtype == torch.float32, (
            f"{label}: Selection.scores must be None or fp32 [N] = [{n}], got {scores!r}")
        assert not scores.requires_grad, f"{label}: Selection.scores require grad; detach them"
    return keep, normalize_by, scores


def _token_part_setup(cls_or_instance: Any, base: type, kind: str, params: dict, *, n_rows: int, padded_vocab: int,
                      vocab_size: int, seed: int) -> tuple[Any, str, dict, dict]:
    """The part under test, its label, the test problem and the :func:`_token_context` keywords (selectors and
    temperature policies)."""
    part = _build_part(cls_or_instance, base, params)
    if padded_vocab % 2 or not 0 < vocab_size <= padded_vocab:
        raise ValueError("padded_vocab must be even and vocab_size in [1, padded_vocab]")
    return (part, f"{kind} {part.name or type(part).__name__}", _token_problem(n_rows, padded_vocab, seed),
            dict(vocab_size=vocab_size, step=3, total_steps=10))


def _state_batches(n_rows: int, padded_vocab: int, vocab_size: int) -> Any:
    """``(step, data rank) -> TokenContext`` of a problem of its own, the batches :func:`_check_state` feeds."""
    return lambda step, data: _token_context(_token_problem(n_rows, padded_vocab, 1000 * data + step),
                                             vocab_size=vocab_size, step=step, total_steps=len(_STEP_LOSSES) + 2)


def _tp_part_context(rank: int, world_size: int, cls: type, config: Any, name: str, problem: dict, vocab_size: int,
                     step: int, total_steps: int) -> tuple[Any, Any]:
    """In a TP worker: the part built from its config and a context over this rank's vocabulary columns."""
    v_local = problem["s"].shape[1] // world_size
    part = cls(config)
    part.name = name
    ctx = _token_context(problem, vocab_size=vocab_size, step=step, total_steps=total_steps,
                         group=torch.distributed.group.WORLD, cols=slice(rank * v_local, (rank + 1) * v_local))
    return part, ctx


def _selector_tp_worker(rank: int, world_size: int, *args: Any):
    keep, normalize_by, scores = _select(*_tp_part_context(rank, world_size, *args))
    return {"keep": keep, "normalize_by": normalize_by, "scores": scores}


def check_selector_contract(cls_or_instance: Any, *, distributed: bool = True, n_rows: int = 12,
                            padded_vocab: int = 24, vocab_size: int = 21, seed: int = 0, atol: float = 2e-5,
                            **params: Any) -> None:
    """Check that a token selector keeps the :class:`~distill_plugins.TokenSelector` contract.

    Promises checked (``ctx`` holds ``N`` valid rows; reference logits are passed too, for
    selectors with ``needs_reference_model``):

    * ``select(ctx)`` returns a :class:`~distill_plugins.Selection` with ``keep`` bool ``[N]``
      on the logits' device, ``normalize_by`` in {"kept", "all"}, ``scores`` None or detached
      fp32 ``[N]``; ``N = 0`` gives an empty ``keep``;
    * it reads only real columns (junk in padded columns changes nothing), does not modify
      ``ctx``'s tensors, and two fresh instances decide the same on the same batch;
    * ``fused_token_stats()`` is None or a tuple of names from ``TOKEN_STATS``;
    * **data-parallel consistency**: two instances that selected on *different* batches but
      received the same ``on_optimizer_step`` figures hold the same ``state_dict()`` and then
      decide the same on one batch (state may depend only on the DP-reduced ``StepStats``);
    * **state round trip**: ``state_dict()`` is plain Python; a fresh instance given
      ``load_state_dict(state)`` reports the same state, decides the same, and stays equal
      after another optimizer step;
    * **TP-identical keep masks** (``distributed``): with the vocabulary split over two gloo
      processes, both ranks return bitwise the same ``keep``, keeping as many tokens as
      TP=1, with scores equal to TP=1's (``atol``).

    Args:
        cls_or_instance: a ``TokenSelector`` subclass (built with ``**params``) or an instance.
        distributed: run the TP=2 check (the class must be importable by name).
        n_rows, padded_vocab, vocab_size, seed: test shape and RNG seed (``padded_vocab`` even).

    Raises:
        AssertionError: naming the broken promise.
    """
    selector, label, problem, kw = _token_part_setup(cls_or_instance, TokenSelector, "selector", params,
                                                     n_rows=n_rows, padded_vocab=padded_vocab,
                                                     vocab_size=vocab_size, seed=seed)
    ctx = _token_context(problem, **kw)
    before = {k: getattr(ctx, k).detach().clone() for k in ("student_logits", "teacher_logits", "reference_logits")}
    keep, normalize_by, scores = _check_selection(_fresh(selector), ctx, label)
    for key, value in before.items():
        assert torch.equal(getattr(ctx, key).detach(), value), f"{label}: select() modified ctx.{key}"
    again = _select(_fresh(selector), _token_context(problem, **kw))
    assert _equal(again[0], keep), f"{label}: two fresh instances keep different tokens on the same batch"
    padded = _select(_fresh(selector), _token_context(problem, padding=50.0, **kw))
    if vocab_size < padded_vocab:
        assert _equal(padded[0], keep), f"{label}: values in padded columns (>= vocab_size) changed the keep mask"
    empty = _select(_fresh(selector), _token_context(problem, rows=torch.arange(0), **kw))[0]
    assert isinstance(empty, torch.Tensor) and empty.shape == (0,), f"{label}: N=0 must give keep of shape [0]"
    _check_fused_stats(selector, label)
    _check_state(selector, label, lambda p, c: _select(p, c)[0], _state_batches(n_rows, padded_vocab, vocab_size))

    if distributed:
        results = run_distributed(_selector_tp_worker, 2, args=(type(selector), selector.config, selector.name,
                                                                problem, vocab_size, 3, 10))
        for rank, res in enumerate(results):
            assert torch.equal(res["keep"], results[0]["keep"]), (
                f"{label}: at TP=2 rank {rank} keeps {res['keep'].tolist()}, rank 0 {results[0]['keep'].tolist()}; "
                "decide from all-reduced per-token scalars so every TP rank keeps the same rows")
            assert res["normalize_by"] == normalize_by, f"{label}: normalize_by differs at TP=2"
            if scores is not None:
                _close(res["scores"], scores, atol, f"{label}: TP=2 scores on rank {rank} differ from TP=1")
        assert int(results[0]["keep"].sum()) == int(keep.sum()), (
            f"{label}: TP=2 keeps {int(results[0]['keep'].sum())} tokens, TP=1 keeps {int(keep.sum())}")


def _temperatures(policy: Any, ctx: Any, selection: Any = None) -> Any:
    if selection is None:
        n = ctx.student_logits.shape[0]
        gen = torch.Generator().manual_seed(n)
        selection = Selection(keep=torch.ones(n, dtype=torch.bool), normalize_by="kept",
                              scores=0.05 + torch.rand(n, generator=gen))
    return policy.temperatures(ctx, selection)


def _check_temperatures(tau: Any, ctx: Any, label: str) -> None:
    n = ctx.student_logits.shape[0]
    if isinstance(tau, torch.Tensor):
        assert tau.shape == (n,) and tau.dtype == torch.float32, (
            f"{label}: temperatures() must return a float or fp32 [N_kept] = [{n}], got {tau.dtype} {tuple(tau.shape)}")
        assert not tau.requires_grad, f"{label}: temperatures require grad (the student logits do); detach them"
        assert tau.device == ctx.student_logits.device, f"{label}: temperatures on {tau.device}"
        assert bool((torch.isfinite(tau) & (tau > 0)).all()), f"{label}: temperatures must be finite and > 0: {tau}"
    else:
        assert isinstance(tau, float) and not isinstance(tau, bool), (
            f"{label}: temperatures() returned {type(tau).__name__}; expected a Python float or an fp32 tensor")
        assert math.isfinite(tau) and tau > 0, f"{label}: temperature {tau} must be finite and > 0"


def _temperature_tp_worker(rank: int, world_size: int, *args: Any):
    return {"tau": _temperatures(*_tp_part_context(rank, world_size, *args))}


def check_temperature_contract(cls_or_instance: Any, *, distributed: bool = True, n_rows: int = 12,
                               padded_vocab: int = 24, vocab_size: int = 21, seed: int = 0, atol: float = 2e-5,
                               **params: Any) -> None:
    """Check that a temperature policy keeps the :class:`~distill_plugins.TemperaturePolicy` contract.

    ``temperatures(ctx, selection)`` is called with ``ctx`` holding the kept rows (student
    logits that require grad) and a selection whose ``scores`` are positive fp32 ``[N]``.
    Promises checked:

    * **shape**: a Python float, or an fp32 ``[N_kept]`` tensor on the logits' device; every
      value finite and > 0; ``N = 0`` works;
    * **detachment**: a tensor result does not require grad;
    * ``scale_loss_by_tau_squared`` is a bool; ``fused_token_stats()`` None or names from ``TOKEN_STATS``;
    * it reads only real columns, and two fresh instances agree on the same batch;
    * data-parallel consistency and the **state round trip**, as for selectors
      (:func:`check_selector_contract`);
    * TP=2 (``distributed``): both ranks return bitwise the same temperatures, equal to TP=1's (``atol``).

    Raises:
        AssertionError: naming the broken promise.
    """
    policy, label, problem, kw = _token_part_setup(cls_or_instance, TemperaturePolicy, "temperature policy", params,
                                                   n_rows=n_rows, padded_vocab=padded_vocab, vocab_size=vocab_size,
                                                   seed=seed)
    assert isinstance(policy.scale_loss_by_tau_squared, bool), (
        f"{label}: scale_loss_by_tau_squared must be a bool, got {policy.scale_loss_by_tau_squared!r}")
    ctx = _token_context(problem, **kw)
    tau = _temperatures(_fresh(policy), ctx)
    _check_temperatures(tau, ctx, label)
    as_tensor = (lambda x: x if isinstance(x, torch.Tensor) else torch.full((n_rows,), float(x)))
    _close(as_tensor(_temperatures(_fresh(policy), _token_context(problem, **kw))), as_tensor(tau), 0.0,
           f"{label}: two fresh instances give different temperatures on the same batch")
    if vocab_size < padded_vocab:
        _close(as_tensor(_temperatures(_fresh(policy), _token_context(problem, padding=50.0, **kw))), as_tensor(tau),
               atol, f"{label}: values in padded columns (>= vocab_size) changed the temperatures")
    empty_ctx = _token_context(problem, rows=torch.arange(0), **kw)
    _check_temperatures(_temperatures(_fresh(policy), empty_ctx), empty_ctx, f"{label} (N=0)")
    _check_fused_stats(policy, label)
    _check_state(policy, label, lambda p, c: as_tensor(_temperatures(p, c)),
                 _state_batches(n_rows, padded_vocab, vocab_size))
    if distributed:
        results = run_distributed(_temperature_tp_worker, 2, args=(type(policy), policy.config, policy.name,
                                                                   problem, vocab_size, 3, 10))
        for rank, res in enumerate(results):
            assert _equal(as_tensor(res["tau"]), as_tensor(results[0]["tau"])), (
                f"{label}: at TP=2 ranks 0 and {rank} give different temperatures; compute them from "
                "all-reduced per-token scalars")
            _close(as_tensor(res["tau"]), as_tensor(tau), atol, f"{label}: TP=2 temperatures differ from TP=1")


# ---------------------------------------------------------------------------
# Vocabulary aligners
# ---------------------------------------------------------------------------


def _aligner_problem(seed: int, *, n_student: int, n_teacher: int, padded: tuple[int, int], vocab: tuple[int, int],
                     hidden: tuple[int, int], paired: bool) -> dict:
    """Full (unsharded) head weights, hidden states, logits ``h W^T``, labels (some -100) and pairs."""
    gen = torch.Generator().manual_seed(seed)
    (ps, pt), (vs, vt), (ds, dt) = padded, vocab, hidden
    ws, wt = 0.5 * torch.randn(ps, ds, generator=gen), 0.5 * torch.randn(pt, dt, generator=gen)
    hs, ht = torch.randn(n_student, ds, generator=gen), torch.randn(n_teacher, dt, generator=gen)
    labels = torch.randint(0, vs, (n_student,), generator=gen)
    labels[::4] = -100
    pairs = None
    if paired:  # monotone pairs, as an exact token alignment gives, over most student rows
        k = min(n_student, n_teacher) - 2
        s_rows = torch.sort(torch.randperm(n_student, generator=gen)[:k]).values
        t_rows = torch.sort(torch.randperm(n_teacher, generator=gen)[:k]).values
        pairs = (s_rows, t_rows)
    return {"ws": ws, "wt": wt, "hs": hs, "ht": ht, "zs": hs @ ws.T, "zt": ht @ wt.T, "labels": labels,
            "pairs": pairs, "vocab": (vs, vt)}


def _make_aligner(cls: type, config: Any, name: str, setup: dict, plugins: tuple, problem: dict, group: Any,
                  rank: int, world: int, seed: int, poison: bool = False) -> Any:
    """Build, set up (objective through a plugin host) and, for hidden-state aligners, ``build_modules``."""
    aligner = cls(config)
    aligner.name = name
    objective = None
    spec = aligner.objective_name_and_params()
    if spec is not None:
        objective = build_plugin_host(list(plugins), entry_points=False).build("objective", spec[0], spec[1])
    aligner.setup(objective=objective, **setup)
    if aligner.needs_hidden_states:
        ws, wt = (_vocab_rows(problem[k], group, rank, world, problem["vocab"][i], poison)
                  for i, k in enumerate(("ws", "wt")))
        modules = aligner.build_modules(ws, wt, tp_group=group, student_vocab_size=problem["vocab"][0],
                                        teacher_vocab_size=problem["vocab"][1], seed=seed)
        assert isinstance(modules, list) and [id(m) for m in modules] == [id(m) for m in aligner.trainable_modules()], (
            f"aligner {name}: build_modules() must return the modules trainable_modules() returns")
    return aligner


def _vocab_rows(w: torch.Tensor, group: Any, rank: int, world: int, vocab_size: int, poison: bool) -> torch.Tensor:
    """This rank's row block of a ``[V_pad, d]`` head weight (padded rows junk when ``poison``)."""
    w = w.clone()
    if poison:
        w[vocab_size:] = 7.0
    if group is None:
        return w
    width = w.shape[0] // world
    return w[rank * width:(rank + 1) * width].clone()


def _aligner_run(aligner: Any, problem: dict, *, group: Any = None, rank: int = 0, world: int = 1,
                 labels: Optional[torch.Tensor] = None, pairs: Any = "all", poison: bool = False) -> dict:
    """One ``loss()`` and backward on this rank's shard; what the contract compares."""
    vs, vt = problem["vocab"]

    def shard(z: torch.Tensor, vocab: int) -> torch.Tensor:
        z = z.clone()
        if poison:
            z[:, vocab:] = 50.0
        if group is None:
            return z
        width = z.shape[1] // world
        return z[:, rank * width:(rank + 1) * width].clone()

    zs = shard(problem["zs"], vs).requires_grad_(True)
    zt = shard(problem["zt"], vt).requires_grad_(True)
    hs, ht = problem["hs"].clone().requires_grad_(True), problem["ht"].clone().requires_grad_(True)
    needs_hidden = aligner.needs_hidden_states
    inputs = AlignerInputs(
        student_logits=zs, teacher_logits=zt, pairs=problem["pairs"] if pairs == "all" else pairs,
        student_labels=(problem["labels"] if labels is None else labels).clone(),
        student_hidden=hs if needs_hidden else None, teacher_hidden=ht if needs_hidden else None,
        student_head_weight=_vocab_rows(problem["ws"], group, rank, world, vs, poison) if needs_hidden else None,
        teacher_head_weight=_vocab_rows(problem["wt"], group, rank, world, vt, poison) if needs_hidden else None,
        tp_group=group, student_vocab_size=vs, teacher_vocab_size=vt, temperature=1.0)
    out = aligner.loss(inputs)
    label = f"aligner {aligner.name or type(aligner).__name__}"
    assert isinstance(out, AlignerOutput), f"{label}: loss() returned {type(out).__name__}, not AlignerOutput"
    loss = out.loss_sum
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32, (
        f"{label}: loss_sum must be a 0-dim fp32 tensor (a token sum), got {loss!r}")
    assert bool(torch.isfinite(loss)), f"{label}: non-finite loss_sum {loss.item()}"
    assert loss.requires_grad, f"{label}: loss_sum does not require grad (also a microbatch without pairs must " \
                               "stay connected to the trainable inputs)"
    loss.backward()
    module_grads = {f"{i}.{n}": (p.grad.clone() if p.grad is not None else None)
                    for i, m in enumerate(aligner.trainable_modules()) for n, p in m.named_parameters()}
    return {"loss": loss.detach(), "num_tokens": out.num_tokens, "terms": dict(out.terms), "report": dict(out.report),
            "rows": int(inputs.rows()[0].numel()), "grad_zs": zs.grad, "grad_zt": zt.grad, "grad_hs": hs.grad,
            "grad_ht": ht.grad, "module_grads": module_grads}


def _aligner_tp_worker(rank: int, world_size: int, cls: type, config: Any, name: str, setup: dict, plugins: tuple,
                       problem: dict, seed: int):
    group = torch.distributed.group.WORLD
    aligner = _make_aligner(cls, config, name, setup, plugins, problem, group, rank, world_size, seed)
    return _aligner_run(aligner, problem, group=group, rank=rank, world=world_size)


def check_aligner_contract(cls_or_instance: Any, *, setup: Optional[dict] = None, plugins: tuple = (),
                           paired: bool = True, student_vocab_size: int = 21, teacher_vocab_size: int = 19,
                           padded: tuple[int, int] = (24, 20), hidden: tuple[int, int] = (8, 6), n_student: int = 12,
                           n_teacher: int = 14, distributed: bool = True, seed: int = 0, atol: float = 2e-5,
                           **params: Any) -> None:
    """Check that a vocabulary aligner keeps the :class:`~distill_plugins.VocabAligner` contract.

    Always: the declared interface (``cross_tokenizer``, ``computes_loss``,
    ``needs_hidden_states`` are bools, ``term_names`` a tuple of str, ``pairing`` ``"eta"`` or
    ``"position"``, ``check()`` a list of str, ``objective_name_and_params()`` None or
    ``(name, params)``, ``learning_rate()`` None or > 0, ``trainable_modules()`` a list of
    modules) and the state round trip (``state_dict()`` plain Python, accepted back by
    ``load_state_dict``).

    For an aligner with ``computes_loss``, on random logits ``h W^T`` of two vocabularies
    (``paired``: different tokenizations with monotone row pairs; else one tokenization,
    ``pairs=None``), student labels with some -100, and for ``needs_hidden_states`` the
    hidden states and head weights (modules from ``build_modules``, which must return
    ``trainable_modules()``):

    * ``loss(inputs)`` returns an :class:`~distill_plugins.AlignerOutput` whose ``loss_sum`` is a
      finite 0-dim fp32 **token sum** requiring grad, ``num_tokens`` the pairs with a valid
      student label, ``terms`` detached scalars named in ``term_names``, ``report`` floats;
    * the student gets finite gradients (logits or hidden states), the teacher none;
    * it is a sum over pairs: two disjoint halves of the labels add up to the whole, pairs
      whose student label is -100 add nothing, no valid label gives 0 (still connected);
    * junk in padded vocabulary columns (logits and head-weight rows) changes nothing; two
      fresh instances agree;
    * TP=2 (``distributed``, vocabulary and head weights split over two gloo processes)
      equals TP=1 in loss, count, terms and every gradient.

    Args:
        cls_or_instance: a ``VocabAligner`` subclass (built with ``**params``) or an instance
            (only its class, config and name are used: each check builds a fresh one).
        setup: keyword arguments of ``setup()`` besides ``objective`` (e.g. ``vocab_map=``);
            picklable when ``distributed``.
        plugins: plugin modules providing the objective named by ``objective_name_and_params()``.
        paired, student_vocab_size, teacher_vocab_size, padded, hidden, n_student, n_teacher:
            the test problem (``paired=False`` needs one vocabulary and ``n_student == n_teacher``).

    Raises:
        AssertionError: naming the broken promise.
    """
    aligner = _build_part(cls_or_instance, VocabAligner, params)
    cls, config, name = type(aligner), aligner.config, aligner.name or type(aligner).__name__
    label = f"aligner {name}"
    setup = dict(setup or {})
    for flag in ("cross_tokenizer", "computes_loss", "needs_hidden_states"):
        assert isinstance(getattr(aligner, flag), bool), f"{label}: {flag} must be a bool"
    assert isinstance(aligner.term_names, tuple) and all(isinstance(t, str) for t in aligner.term_names), (
        f"{label}: term_names must be a tuple of str, got {aligner.term_names!r}")
    assert aligner.pairing in ("eta", "position"), f"{label}: pairing={aligner.pairing!r} is not 'eta' or 'position'"
    problems = aligner.check(student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), (
        f"{label}: check() must return a list of str, got {problems!r}")
    spec = aligner.objective_name_and_params()
    assert spec is None or (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)
                            and isinstance(spec[1], dict)), f"{label}: objective_name_and_params() returned {spec!r}"
    lr = aligner.learning_rate()
    assert lr is None or (isinstance(lr, float) and lr > 0), f"{label}: learning_rate() returned {lr!r}"
    state = aligner.state_dict()
    assert isinstance(state, dict) and _is_plain(state), f"{label}: state_dict() must be plain Python, got {state!r}"
    restored = _fresh(aligner)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state, f"{label}: load_state_dict(state_dict()) does not restore the state"
    if not aligner.computes_loss:
        return

    if not paired and (student_vocab_size, padded[0], n_student) != (teacher_vocab_size, padded[1], n_teacher):
        raise ValueError("paired=False needs one vocabulary (equal sizes and padding) and n_student == n_teacher")
    problem = _aligner_problem(seed, n_student=n_student, n_teacher=n_teacher, padded=padded,
                               vocab=(student_vocab_size, teacher_vocab_size), hidden=hidden, paired=paired)

    def run(**kw):
        poison = kw.get("poison", False)
        part = _make_aligner(cls, config, name, setup, plugins, problem, None, 0, 1, seed, poison=poison)
        return _aligner_run(part, problem, **kw)

    base = run()
    assert isinstance(base["num_tokens"], int) and base["num_tokens"] == base["rows"], (
        f"{label}: num_tokens={base['num_tokens']!r}; expected the {base['rows']} pairs with a valid student label")
    for key, value in base["terms"].items():
        assert key in aligner.term_names or not aligner.term_names or key in ("kd",), (
            f"{label}: term {key!r} is not among term_names {aligner.term_names}")
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, (
            f"{label}: terms[{key!r}] must be a detached scalar tensor")
    for key, value in base["report"].items():
        assert isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool), (
            f"{label}: report[{key!r}]={value!r} is not a number")
    student_grads = [g for g in (base["grad_zs"], base["grad_hs"]) if g is not None]
    assert student_grads and any(bool(g.any()) for g in student_grads), (
        f"{label}: the student (logits or hidden states) gets no gradient")
    assert all(bool(torch.isfinite(g).all()) for g in student_grads), f"{label}: non-finite student gradient"
    for key in ("grad_zt", "grad_ht"):
        g = base[key]
        assert g is None or not bool(g.any()), f"{label}: the teacher's {key[5:]} received a gradient"
    for key, g in base["module_grads"].items():
        assert g is None or bool(torch.isfinite(g).all()), f"{label}: non-finite gradient of module parameter {key}"

    _close(run()["loss"], base["loss"], 0.0, f"{label}: two fresh instances give different losses")
    _close(run(poison=True)["loss"], base["loss"], atol,
           f"{label}: junk in padded vocabulary columns / head-weight rows changed the loss")

    labels = problem["labels"]
    valid = torch.nonzero(labels != -100).flatten()
    half = torch.zeros_like(labels, dtype=torch.bool)
    half[valid[::2]] = True
    first = run(labels=torch.where(half, labels, torch.full_like(labels, -100)))
    second = run(labels=torch.where(half | (labels == -100), torch.full_like(labels, -100), labels))
    _close(first["loss"] + second["loss"], base["loss"], atol,
           f"{label}: loss_sum is not a sum over pairs (two halves of the labels do not add up to the whole)")
    assert first["num_tokens"] + second["num_tokens"] == base["num_tokens"], f"{label}: num_tokens do not add up"
    if problem["pairs"] is not None:
        s_rows, t_rows = problem["pairs"]
        keep = labels[s_rows] != -100
        dropped = run(pairs=(s_rows[keep], t_rows[keep]))
        _close(dropped["loss"], base["loss"], atol, f"{label}: pairs whose student label is -100 changed the loss")
    none = run(labels=torch.full_like(labels, -100))
    assert none["num_tokens"] == 0 and float(none["loss"]) == 0.0, (
        f"{label}: no valid label must give loss_sum 0 and num_tokens 0, got {none['loss']}, {none['num_tokens']}")

    if distributed:
        results = run_distributed(_aligner_tp_worker, 2, args=(cls, config, name, setup, tuple(plugins), problem,
                                                               seed))
        for rank, res in enumerate(results):
            where = f"{label}: TP=2 rank {rank}"
            _close(res["loss"], base["loss"], atol, f"{where}: loss_sum differs from TP=1")
            assert res["num_tokens"] == base["num_tokens"], f"{where}: num_tokens differs from TP=1"
            for key, value in base["terms"].items():
                _close(res["terms"][key], value, atol, f"{where}: term {key!r} differs from TP=1")
            if base["grad_hs"] is not None:
                _close(res["grad_hs"], base["grad_hs"], atol, f"{where}: student hidden-state gradient differs")
            for key, g in base["module_grads"].items():
                if g is not None:
                    _close(res["module_grads"][key], g, atol, f"{where}: gradient of module parameter {key} differs")
        if base["grad_zs"] is not None:
            _close(torch.cat([r["grad_zs"] for r in results], dim=1), base["grad_zs"], atol,
                   f"{label}: TP=2 student-logit gradient differs from TP=1")
