"""``dskd``: dual-space knowledge distillation (DSKD v2) with trainable projectors.

Maths (per aligned pair: student row j, teacher row i; ``sg`` = stop-gradient)
-------------------------------------------------------------------------------
Heads as torch weights ``W_s [V_s, d_s]``, ``W_t [V_t, d_t]`` (logits ``z = W h``).
Two bias-free projectors, ``P_t2s: d_t -> d_s`` and ``P_s2t: d_s -> d_t``:

* student space: ``z_t2s = sg[W_s] P_t2s h_t[i]`` (the student's output layer,
  detached); ``t2s_ce = CE(z_t2s, y)`` trains the projector only, where ``y``
  is the teacher's argmax at ``i`` mapped to the student id with the same
  bytes (v2; ``t2s_ce_target: gold`` uses the student's label instead);
  ``t2s_kd = D(z_s[j], sg[z_t2s])`` on rows where ``argmax z_t2s == y``
  (``agreement_mask``).
* teacher space: ``z_s2t = sg[W_t] P_s2t h_s[j]`` (the frozen teacher's output
  layer); ``s2t_kd = D(z_s2t, z_t[i])`` trains the student and ``P_s2t``.
* ``loss = w_ce t2s_ce + w_t2s t2s_kd + w_s2t s2t_kd``, summed over the aligned
  pairs with a valid student label; ``D`` is any registered objective
  (``objective`` key), in each space with that space's vocabulary.

Differences from the reference code: every term is a token *sum* normalised
by the engine with one global count of aligned tokens (v2 divides ``t2s_kd``
by the number of agreeing tokens instead); temperature comes from the
engine's temperature policy and goes to the objective; no tau^2.

Initialisation (v2 "ideal" init, Gram form; methods.md 3(f) DERIVED)
--------------------------------------------------------------------
Logit equivalence ``W_s P_t2s ~= W_t`` over the paired vocabulary rows gives the
least-squares solution ``P_t2s = (W_s^T W_s + l I)^-1 W_s^T W_t`` and likewise
``P_s2t = (W_t^T W_t + l I)^-1 W_t^T W_s``, the Gram form of
``W_t pinv(W_s)``. Rows are the real ids of one vocabulary (same tokenizer)
or the token pairs with equal bytes (different tokenizers). The Gram products
are sums over vocabulary rows: each rank adds its shard's rows and one SUM
all-reduce completes them; for two vocabularies the cross product needs the
teacher's shard of each rank in turn (one broadcast per rank, once). fp64
with a ridge ``l = ridge * trace(G) / d``.

Tensor parallelism
------------------
Projectors are replicated on every TP rank. Projected logits use the local
head shard (``[K, V_local]``), so every divergence is the standard
vocab-parallel one. A copy-to-TP op (identity forward, SUM all-reduce
backward) sits before each head, so the gradients reaching the projectors and
the student's hidden states are the full ones, equal on all ranks: no separate
TP all-reduce of projector gradients is needed. Across data-parallel ranks
the engine reduces projector gradients like the model's
(:meth:`DSKDAligner.all_reduce_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..interfaces import PartConfig
from ..parallel import all_reduce_sum, group_rank, group_size, vocab_parallel_logsumexp, vocab_shard_start
from ._tp import all_reduce_, copy_to_tp, local_columns, vocab_parallel_argmax
from .base import AlignerBase, AlignerInputs, AlignerOutput, ObjectiveSpec, coverage_report, validate_objective_spec
from .vocab import VocabMap, same_vocabulary

__all__ = ["DSKDAligner", "DSKDProjectors", "projector_init", "vocab_parallel_cross_entropy"]


class DSKDProjectors(torch.nn.Module):
    """The two bias-free projectors: ``t2s: d_t -> d_s`` and ``s2t: d_s -> d_t``."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, *, dtype=torch.float32, device=None,
                 seed: int = 0):
        super().__init__()
        self.t2s = torch.nn.Linear(teacher_hidden_size, student_hidden_size, bias=False, dtype=dtype, device=device)
        self.s2t = torch.nn.Linear(student_hidden_size, teacher_hidden_size, bias=False, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(seed)  # same random init on every rank
        with torch.no_grad():
            for lin in (self.t2s, self.s2t):
                bound = lin.in_features ** -0.5
                lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))


def _real_rows(weight: torch.Tensor, vocab_size: Optional[int], group: Any) -> torch.Tensor:
    """Local shard rows that are real (not padding): the weight with padding rows zeroed."""
    if vocab_size is None:
        return weight
    start = vocab_shard_start(weight.shape[0], group)
    keep = (torch.arange(start, start + weight.shape[0], device=weight.device) < vocab_size).unsqueeze(-1)
    return torch.where(keep, weight, torch.zeros_like(weight))


@torch.no_grad()
def projector_init(student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor, *, tp_group: Any = None,
                   vocab_map: Optional[VocabMap] = None, student_vocab_size: Optional[int] = None,
                   teacher_vocab_size: Optional[int] = None, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares projector weights from the two heads' vocabulary shards.

    Args:
        student_head_weight: ``[Vs_local, d_s]`` this rank's student head shard.
        teacher_head_weight: ``[Vt_local, d_t]``.
        tp_group: the group both heads are sharded over.
        vocab_map: pairs of ids with equal bytes; None means one vocabulary
            (id v pairs with id v, for v below the real size).
        student_vocab_size, teacher_vocab_size: real sizes (padding rows ignored).
        ridge: relative ridge ``l = ridge * trace(G) / d``.

    Returns:
        ``(t2s_weight [d_s, d_t], s2t_weight [d_t, d_s])`` in fp64, identical
        on every rank (``nn.Linear`` weight layout).
    """
    ws = student_head_weight.detach().double()
    wt = teacher_head_weight.detach().double()
    vs_local, vt_local = ws.shape[0], wt.shape[0]
    if vocab_map is None:
        size = min(x for x in (student_vocab_size, teacher_vocab_size, vs_local * group_size(tp_group),
                               vt_local * group_size(tp_group)) if x is not None)
        vocab_map = VocabMap.identity(size)
    s_ids = vocab_map.student_ids.to(ws.device)
    t_ids = vocab_map.teacher_ids.to(ws.device)
    # Gram products over the paired rows this rank holds
    s_pos, s_loc = local_columns(s_ids, vs_local, tp_group)
    _, t_loc = local_columns(t_ids, vt_local, tp_group)
    g_ss = ws[s_loc].T @ ws[s_loc]
    g_tt = wt[t_loc].T @ wt[t_loc]
    world = group_size(tp_group)
    if world == 1:
        c_st = ws[s_ids].T @ wt[t_ids]
    elif vs_local == vt_local and torch.equal(s_ids, t_ids):  # one vocabulary, one layout: rows are local
        c_st = ws[s_loc].T @ wt[s_loc]
    else:  # each rank's teacher shard in turn meets the student rows paired with it
        c_st = torch.zeros(ws.shape[1], wt.shape[1], dtype=torch.float64, device=ws.device)
        me, ranks = group_rank(tp_group), dist.get_process_group_ranks(tp_group)
        paired_t = t_ids[s_pos]
        for src in range(world):
            shard = wt.clone() if src == me else torch.empty_like(wt)
            dist.broadcast(shard, src=ranks[src], group=tp_group)
            t_start = src * vt_local
            mine = (paired_t >= t_start) & (paired_t < t_start + vt_local)
            c_st += ws[s_loc[mine]].T @ shard[paired_t[mine] - t_start]
    for x in (g_ss, g_tt, c_st):
        all_reduce_(x, tp_group)

    def solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        d = gram.shape[0]
        lam = ridge * torch.trace(gram) / d
        return torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device), rhs)

    return solve(g_ss, c_st), solve(g_tt, c_st.T)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Any,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-row ``-log softmax(logits)[target]`` over a sharded vocabulary; 0 where target == -100.

    Args:
        logits: ``[N, V_local]`` (differentiable).
        target: ``[N]`` global ids or -100.

    Returns:
        fp32 ``[N]``, replicated over the group. Does not modify ``logits``.
    """
    lse = vocab_parallel_logsumexp(logits, group, vocab_size)
    v_local = logits.shape[-1]
    local = target - vocab_shard_start(v_local, group)
    here = (target >= 0) & (local >= 0) & (local < v_local)
    picked = logits.float().gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = all_reduce_sum(torch.where(here, picked, torch.zeros_like(picked)), group)
    return torch.where(target >= 0, lse - target_logit, torch.zeros_like(lse))


class DSKDAligner(AlignerBase):
    """Dual-space KD; same tokenizer (``pairs=None``) or two tokenizers with ETA pairs.

    Engine sequence (:class:`~distill_plugins.interfaces.VocabAligner`): ``setup(...)``,
    :meth:`build_modules` (``build_projectors(d_s, d_t)`` then ``init_projectors``
    from both output-layer shards; a resume overwrites them), the parameters of
    :meth:`trainable_modules` into the optimizer (``learning_rate()`` =
    ``projector_lr``) and the checkpoint, then :meth:`loss` per microbatch.
    """

    needs_hidden_states = True
    term_names = ("t2s_ce", "t2s_kd", "s2t_kd")

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        objective: ObjectiveSpec = field(default="forward_kl", metadata={
            "help": "registered objective D used in both spaces: a name or {name: ..., <params>}"})
        t2s_ce_weight: float = field(default=1.0, metadata={"help": "weight of t2s_ce (trains the t2s projector)"})
        t2s_kd_weight: float = field(default=1.0, metadata={"help": "weight of t2s_kd = D(z_s, sg[z_t2s])"})
        s2t_kd_weight: float = field(default=1.0, metadata={"help": "weight of s2t_kd = D(z_s2t, z_t)"})
        t2s_ce_target: Literal["teacher_argmax", "gold"] = field(default="teacher_argmax", metadata={
            "help": "labels of t2s_ce: the teacher's argmax mapped to student ids (v2) or the gold token"})
        agreement_mask: bool = field(default=True, metadata={
            "help": "t2s_kd only where argmax z_t2s equals the t2s_ce label (v2)"})
        init: Literal["pinv", "random"] = field(default="pinv", metadata={
            "help": "projector init: least-squares logit equivalence (v2) or random (v1)"})
        ridge: float = field(default=1e-6, metadata={"help": "relative ridge of the pinv init"})
        projector_lr: Optional[float] = field(default=None, metadata={
            "help": "learning rate of the projectors' parameter group; null = training.lr"})

        def __post_init__(self):
            validate_objective_spec(self.objective)
            for key in ("t2s_ce_weight", "t2s_kd_weight", "s2t_kd_weight"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
            if self.ridge < 0:
                raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
            if self.projector_lr is not None and self.projector_lr <= 0:
                raise ValueError(f"projector_lr must be > 0, got {self.projector_lr!r}")

    projectors: Optional[DSKDProjectors] = None
    vocab_map: Optional[VocabMap] = None

    # -- engine-facing set-up ------------------------------------------------
    def setup(self, *, student_tokenizer: Any = None, teacher_tokenizer: Any = None, objective=None,
              vocab_map: Optional[VocabMap] = None, **kwargs: Any) -> None:
        """Tokenizers (different ones -> shared-token map) and the bound objective."""
        super().setup(student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, objective=objective)
        if vocab_map is None and student_tokenizer is not None and teacher_tokenizer is not None:
            if not same_vocabulary(student_tokenizer, teacher_tokenizer):
                vocab_map = VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
        self.vocab_map = vocab_map
        self._t2s_ids: Optional[torch.Tensor] = None

    def build_projectors(self, student_hidden_size: int, teacher_hidden_size: int, *, dtype=torch.float32,
                         device=None, seed: int = 0) -> DSKDProjectors:
        """Create the projectors (same random init on every rank, from ``seed``)."""
        self.projectors = DSKDProjectors(student_hidden_size, teacher_hidden_size, dtype=dtype, device=device,
                                         seed=seed)
        return self.projectors

    def init_projectors(self, student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                        tp_group: Any = None, student_vocab_size: Optional[int] = None,
                        teacher_vocab_size: Optional[int] = None) -> None:
        """Apply the configured init (``pinv``: least squares over the paired vocabulary rows)."""
        if self.projectors is None:
            self.build_projectors(student_head_weight.shape[1], teacher_head_weight.shape[1],
                                  device=student_head_weight.device)
        if self.config.init != "pinv":
            return
        t2s, s2t = projector_init(student_head_weight, teacher_head_weight, tp_group=tp_group,
                                  vocab_map=self.vocab_map, student_vocab_size=student_vocab_size,
                                  teacher_vocab_size=teacher_vocab_size, ridge=self.config.ridge)
        with torch.no_grad():
            self.projectors.t2s.weight.copy_(t2s)
            self.projectors.s2t.weight.copy_(s2t)

    def build_modules(self, student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                      tp_group: Any = None, student_vocab_size: Optional[int] = None,
                      teacher_vocab_size: Optional[int] = None, seed: int = 0) -> list[torch.nn.Module]:
        """Build the projectors (random init from ``seed``, fp32) and apply the configured init."""
        self.build_projectors(student_head_weight.shape[1], teacher_head_weight.shape[1], dtype=torch.float32,
                              device=student_head_weight.device, seed=seed)
        self.init_projectors(student_head_weight, teacher_head_weight, tp_group=tp_group,
                             student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size)
        return self.trainable_modules()

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The projectors once built (none off the last pipeline stage, where they are never built)."""
        return [self.projectors] if self.projectors is not None else []

    def learning_rate(self) -> Optional[float]:
        return self.config.projector_lr

    def all_reduce_gradients(self, dp_group: Any, average: bool = True) -> None:
        """SUM (or mean) the projector gradients over ``dp_group``, matching how the model's are reduced."""
        if dp_group is None or group_size(dp_group) == 1:
            return
        for p in self.projectors.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=dp_group)
                if average:
                    p.grad /= group_size(dp_group)

    def check(self, *, student_vocab_size: Optional[int], teacher_vocab_size: Optional[int], **info: Any) -> list[str]:
        errors = self._check_objective(info)
        name = self.name or "dskd"
        s_tok, t_tok = info.get("student_tokenizer"), info.get("teacher_tokenizer")
        if t_tok is None or s_tok is None:
            if student_vocab_size is not None and teacher_vocab_size is not None and \
                    student_vocab_size != teacher_vocab_size:
                errors.append(f"aligner {name!r}: the student's vocabulary ({student_vocab_size}) and the teacher's "
                              f"({teacher_vocab_size}) differ, so both tokenizers are needed to align the texts: "
                              "set data.tokenizer and data.teacher_tokenizer")
        else:
            errors += self._check_tokenizers(name, info)
        return errors

    # -- the loss ---------------------------------------------------------------
    def _teacher_to_student_ids(self, device) -> Optional[torch.Tensor]:
        if self.vocab_map is None:
            return None
        if self._t2s_ids is None or self._t2s_ids.device != torch.device(device):
            self._t2s_ids = self.vocab_map.teacher_to_student().to(device)
        return self._t2s_ids

    def loss(self, inputs: AlignerInputs) -> AlignerOutput:
        """The three DSKD terms over the aligned pairs (sums; ``num_tokens`` = pairs)."""
        if self.projectors is None:
            raise RuntimeError("DSKDAligner.loss: call build_projectors()/init_projectors() first")
        for key in ("student_hidden", "teacher_hidden", "student_head_weight", "teacher_head_weight"):
            if getattr(inputs, key) is None:
                raise ValueError(f"DSKDAligner.loss needs AlignerInputs.{key}")
        cfg, group = self.config, inputs.tp_group
        s_rows, t_rows = inputs.rows()
        if s_rows.numel() == 0:
            return self._empty(inputs, s_rows)
        zs = inputs.student_logits[s_rows]
        zt = inputs.teacher_logits[t_rows].detach()
        hs = inputs.student_hidden[s_rows]
        ht = inputs.teacher_hidden[t_rows].detach()
        ws, wt = inputs.student_head_weight.detach(), inputs.teacher_head_weight.detach()
        proj = self.projectors
        p_dtype = proj.t2s.weight.dtype

        # student space: teacher hidden -> student head
        h_t2s = proj.t2s(ht.to(p_dtype))
        z_t2s = F.linear(copy_to_tp(h_t2s, group).to(ws.dtype), ws)
        if cfg.t2s_ce_target == "gold":
            if inputs.student_labels is None:
                raise ValueError("DSKD t2s_ce_target='gold' needs AlignerInputs.student_labels")
            target = inputs.student_labels.to(zs.device)[s_rows].long()
        else:
            target = vocab_parallel_argmax(zt, group, inputs.teacher_vocab_size)
            mapping = self._teacher_to_student_ids(zs.device)
            if mapping is not None:
                target = torch.where(target < mapping.numel(), mapping[target.clamp(max=mapping.numel() - 1)],
                                     torch.full_like(target, -1))
                target = torch.where(target >= 0, target, torch.full_like(target, -100))
        t2s_ce = vocab_parallel_cross_entropy(z_t2s, target, group, inputs.student_vocab_size)
        valid = target != -100
        if cfg.agreement_mask:
            agree = valid & (vocab_parallel_argmax(z_t2s, group, inputs.student_vocab_size) == target)
        else:
            agree = torch.ones_like(valid)
        t2s_kd = self.objective(zs, z_t2s.detach(), temperature=inputs.temperature, tp_group=group,
                                vocab_size=inputs.student_vocab_size) * agree

        # teacher space: student hidden -> frozen teacher head
        h_s2t = proj.s2t(hs.to(p_dtype))
        z_s2t = F.linear(copy_to_tp(h_s2t, group).to(wt.dtype), wt)
        s2t_kd = self.objective(z_s2t, zt, temperature=inputs.temperature, tp_group=group,
                                vocab_size=inputs.teacher_vocab_size)

        terms = {"t2s_ce": t2s_ce.sum(), "t2s_kd": t2s_kd.sum(), "s2t_kd": s2t_kd.sum()}
        total = (cfg.t2s_ce_weight * terms["t2s_ce"] + cfg.t2s_kd_weight * terms["t2s_kd"]
                 + cfg.s2t_kd_weight * terms["s2t_kd"])
        n = int(s_rows.numel())
        report = coverage_report(inputs, s_rows, {
            "t2s_target_valid": float(valid.sum()),
            "t2s_agreement": float(agree.sum()) / n if n else 0.0,
        })
        return AlignerOutput(total, n, {k: v.detach() for k, v in terms.items()}, report)
