"""Markdown tables and loss-curve figures for the demo and the quality benchmark.

Design: plain functions from already-computed numbers to text or a PNG; no
training or evaluation here. Figures use matplotlib's ``Agg`` backend (no
display needed), selected before pyplot is imported.

Loss curves come from each run's ``metrics.jsonl`` (written by the engine in
the run's ``output_dir``, one JSON object per line). :func:`curve_series`
picks, per record, the step (``step``) and the values of the first key found
among a list of candidates, so the plots keep working when the engine adds
fields: the training objective (``loss``), the student's cross-entropy on its
training batches (``ce``/``student_ce``/``lm_loss``...) and held-out
evaluations (``eval_ce``/``valid_ce``/...; records written by evaluations).

Usage::

    print(markdown_table(rows, [("name", "student", "{}"), ("ce", "held-out CE", "{:.3f}")]))
    plot_loss_curves({"CE only": "runs/demo/student_ce/metrics.jsonl", ...}, "runs/demo/loss_curves.png")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from distill_plugins.demo.evaluate import read_metrics

PathLike = Union[str, Path]

#: Candidate metric keys, in preference order, for each plotted quantity.
LOSS_KEYS = ("loss", "train_loss", "total_loss", "lm loss")
TRAIN_CE_KEYS = ("student_ce", "ce_loss", "ce", "lm_loss", "train_ce")
EVAL_CE_KEYS = ("eval_student_ce", "eval_ce_loss", "eval_ce", "valid_ce", "eval_lm_loss")

Column = tuple  # (key, header, format)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _layout(rows: Sequence[Mapping[str, Any]],
            columns: Sequence[Column]) -> tuple[list[str], list[list[str]], list[int]]:
    """``(headers, cells, widths)`` of a table: formatted cells and each column's width in characters."""
    headers = [c[1] for c in columns]
    cells = [[_fmt(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    return headers, cells, widths


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table; ``columns`` are ``(key, header, format)``; numeric columns right-aligned."""
    headers, cells, widths = _layout(rows, columns)
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) and
               any(isinstance(row.get(key), (int, float)) for row in rows) for key, _, _ in columns]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    body = ["| " + " | ".join((c.rjust(w) if num else c.ljust(w)) for c, w, num in zip(r, widths, numeric)) + " |"
            for r in cells]
    return "\n".join([line, sep] + body)


def plain_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The same table as aligned plain text (for terminals)."""
    headers, cells, widths = _layout(rows, columns)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------


def _first_key(record: Mapping[str, Any], keys: Iterable[str], positive: bool = False) -> Optional[str]:
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if positive and value <= 0:
                continue  # the engine logs 0.0 for a quantity it did not compute (e.g. CE with ce_weight 0)
            return key
    return None


def curve_series(records: Sequence[Mapping[str, Any]], keys: Sequence[str], *, require: Optional[str] = None,
                 positive: bool = False) -> tuple[list[int], list[float], Optional[str]]:
    """``(steps, values, key)`` of the first of ``keys`` present in the records that have a ``step``.

    ``require``: only records containing this key (e.g. to separate evaluation records).
    ``positive``: ignore values <= 0 (cross-entropies the engine did not compute).
    The key is chosen once (the first candidate any record has), so one curve
    never mixes two quantities.
    """
    chosen = None
    for key in keys:
        if any(_first_key(r, (key,), positive) for r in records
               if "step" in r and (require is None or require in r)):
            chosen = key
            break
    if chosen is None:
        return [], [], None
    steps, values = [], []
    for r in records:
        if "step" in r and (require is None or require in r) and _first_key(r, (chosen,), positive):
            steps.append(int(r["step"]))
            values.append(float(r[chosen]))
    return steps, values, chosen


def _pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend (selected before pyplot is imported; no display needed)."""
    # matplotlib is imported when a figure is drawn, not with this module: the Agg backend must be selected
    # before pyplot loads, and selecting it at import would switch the backend of any program importing the tables
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), see the comment above

    return plt


def _save_figure(fig, out: PathLike, title: str = "", **title_kw) -> Path:
    """Add the title (if any), lay out, write ``out`` as a 110 dpi PNG (parent created) and close ``fig``.

    Returns:
        ``out`` as a Path.
    """
    if title:
        fig.suptitle(title, **title_kw)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def _smooth(values: Sequence[float], window: int) -> list[float]:
    if window <= 1 or len(values) < window:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(runs: Mapping[str, PathLike], out: PathLike, *, title: str = "",
                     reference: Optional[Mapping[str, float]] = None,
                     final: Optional[Mapping[str, tuple[int, float]]] = None,
                     ce_title: Optional[str] = None) -> Path:
    """Write a PNG with, per run, its training objective and its student cross-entropy curves.

    Args:
        runs: label -> metrics.jsonl path.
        out: PNG path (parent created).
        title: figure title.
        reference: horizontal reference lines for the CE panel, label -> value
            (e.g. ``{"teacher held-out CE": 3.1}``).
        final: per run label, ``(step, held-out CE)`` of the final evaluation, drawn
            as a marker in the CE panel (every run gets one, even when its
            metrics hold no cross-entropy because it trained on KD alone).
        ce_title: title of the CE panel (default: cross-entropy on real next tokens).

    Returns:
        ``out`` as a Path.
    """
    plt = _pyplot()
    data = {label: read_metrics(path) for label, path in runs.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss, ax_ce = axes
    for label, records in data.items():
        steps, values, _ = curve_series(records, LOSS_KEYS)
        color = None
        if steps:
            line, = ax_loss.plot(steps, _smooth(values, 5), label=label)
            color = line.get_color()
        esteps, evalues, _ = curve_series(records, EVAL_CE_KEYS, positive=True)
        tsteps, tvalues, _ = curve_series(records, TRAIN_CE_KEYS, positive=True)
        if tsteps:
            ax_ce.plot(tsteps, _smooth(tvalues, 10), alpha=0.8, color=color, label=f"{label} (training batches)")
        if esteps:
            ax_ce.plot(esteps, evalues, marker="o", ms=3, ls="--", color=color, label=f"{label} (held-out)")
        if final and label in final:
            fstep, fvalue = final[label]
            ax_ce.plot([fstep], [fvalue], marker="*", ms=13, ls="none", color=color,
                       markeredgecolor="black", label=f"{label}: final held-out {fvalue:.3f}")
    for name, value in (reference or {}).items():
        ax_ce.axhline(value, color="black", ls=":", lw=1)
        ax_ce.annotate(name, (0.99, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)
    ax_loss.set_title("training objective (each run's own loss)")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_ce.set_title(ce_title or "student cross-entropy on real next tokens")
    ax_ce.set_xlabel("optimizer step")
    ax_ce.set_ylabel("nats / token")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save_figure(fig, out, title)


def plot_metric_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[tuple[str, str]], out: PathLike, *,
                     label_key: str = "name", title: str = "") -> Path:
    """One bar panel per metric (mean with a min..max error bar over seeds) for the quality benchmark.

    ``rows`` hold ``<metric>_mean``, ``<metric>_min``, ``<metric>_max`` for each
    ``(metric, axis label)`` in ``metrics``.
    """
    plt = _pyplot()
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 0.32 * len(rows) + 1.6), sharey=True)
    axes = [axes] if n == 1 else list(axes)
    labels = [str(r[label_key]) for r in rows]
    ypos = list(range(len(rows)))
    for ax, (metric, axis_label) in zip(axes, metrics):
        means = [r.get(f"{metric}_mean") for r in rows]
        lo = [(m - r.get(f"{metric}_min", m)) if m is not None else 0 for m, r in zip(means, rows)]
        hi = [(r.get(f"{metric}_max", m) - m) if m is not None else 0 for m, r in zip(means, rows)]
        vals = [m if m is not None else float("nan") for m in means]
        ax.barh(ypos, vals, xerr=[lo, hi], color="tab:blue", alpha=0.75, ecolor="black", capsize=2)
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            span = max(finite) - min(finite)
            ax.set_xlim(max(0.0, min(finite) - 0.6 * span - 1e-6), max(finite) + 0.6 * span + 1e-6)
        ax.set_title(axis_label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    return _save_figure(fig, out, title, fontsize=10)
