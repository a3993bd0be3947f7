"""The embedded-default demo: corpus, tokenizer, cached teacher, three students, held-out table.

Design
------
:func:`run_demo` runs five stages, logging each with its wall time:

1. **data**: the stdlib-docstring corpus, its byte-level BPE and megatron
   indexed datasets (:func:`distill_plugins.data.embedded.build_embedded`;
   built once, cached under ``$DISTILL_CACHE`` or ``~/.cache/distill_plugins``).
2. **teacher**: ``recipes/demo/teacher.yaml`` (cross-entropy pretraining of a
   4x128 model) run by ``distill run`` in a subprocess, unless the cache already
   holds a teacher for the same resolved recipe, tokenizer and corpus
   (:func:`teacher_cache_key`). The final weights are converted to a megatron
   ``dist_checkpointing`` checkpoint (layout-independent, so students load it
   at any TP through ``teacher.megatron``) and ``teacher.json`` (written last,
   the completion marker) records its held-out cross-entropy.
3. **students**: ``recipes/demo/student_{ce,fkl,csd}.yaml``, each under
   ``torchrun --standalone --nproc-per-node N`` (N = TP = 2 by default) with the
   same steps, tokens, seed and learning rate: the CE-only baseline, forward KL
   and CSD. Every subprocess's output is streamed (the engine logs per-step
   progress) and kept in ``<run>/console.log``.
4. **evaluate**: every model rebuilt at TP=1 in this process
   (:mod:`distill_plugins.demo.evaluate`), scored on the whole held-out test
   split: cross-entropy, KL(teacher || student), reverse KL, top-1 agreement.
5. **report**: the table on stdout, ``demo_results.{md,json}`` and
   ``loss_curves.png`` in the output directory.

Nothing from the teacher initialises a student: the students start from the
same random initialisation (same seed), so differences come from the training
signal alone.

Usage::

    from distill_plugins.demo.pipeline import DemoSettings, run_demo
    result = run_demo(DemoSettings(output_dir="runs/demo"))
    result.rows            # one dict per model: name, ce, fkl, rkl, top1, train_seconds
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO, Union

from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger

log = get_logger(__name__)

PathLike = Union[str, Path]

#: The demo's students: short name -> (recipe file, table label).
STUDENTS: dict[str, tuple[str, str]] = {
    "ce": ("student_ce.yaml", "student, CE only (no teacher)"),
    "fkl": ("student_fkl.yaml", "student, forward KL"),
    "csd": ("student_csd.yaml", "student, CSD"),
}

#: Output lines of subprocesses not echoed to the terminal (still in console.log): megatron's
#: import-time notices that transformer-engine/apex are absent and deprecation notices from
#: dist_checkpointing, repeated by every process. The indented source line Python prints after
#: a warning is dropped with it.
QUIET_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                  "full scope is deprecated", "`load_state_dict` is deprecated", "deprecating ShardedTensor",
                  "CUDA_DEVICE_MAX_CONNECTIONS", "Setting OMP_NUM_THREADS environment variable")

#: Bump to invalidate cached teachers when the conversion or manifest format changes.
TEACHER_CACHE_VERSION = 1


def default_recipes_dir() -> Path:
    """``recipes/demo`` of the source tree this package runs from (editable installs, checkouts)."""
    return Path(__file__).resolve().parents[2] / "recipes" / "demo"


@dataclass(frozen=True)
class DemoSettings:
    """What :func:`run_demo` does; every field has a command-line flag in :mod:`distill_plugins.cli.demo`.

    Attributes:
        output_dir: where runs, the table and the PNG go.
        cache: cache root (default ``$DISTILL_CACHE`` or ``~/.cache/distill_plugins``).
        recipes_dir: folder with ``teacher.yaml`` and ``student_*.yaml``.
        students: which students to train, from :data:`STUDENTS`, in table order.
        steps: optimizer steps of every student (None: the recipes' value).
        teacher_steps: optimizer steps of the teacher (None: the recipe's value).
        nproc: processes per student run (the students' TP size; 2 = the CSD-at-TP=2 demo).
        teacher_nproc: processes of the teacher run (data-parallel; 2 = faster than one 2-thread process on 2 cores).
        seed: seed of every run (students share it).
        overrides: ``key=value`` overrides for every run (teacher and students).
        teacher_overrides: ``key=value`` overrides for the teacher run only (its model is ``student.*`` there).
        student_overrides: ``key=value`` overrides for the students only.
        rebuild_teacher: retrain the teacher even when a cached one exists.
        eval_windows: at most this many held-out windows (None: the whole test split).
        stream: where subprocess output is echoed (None: not echoed; always in console.log).
    """

    output_dir: Path = Path("runs/demo")
    cache: Optional[Path] = None
    recipes_dir: Path = field(default_factory=default_recipes_dir)
    students: tuple[str, ...] = ("ce", "fkl", "csd")
    steps: Optional[int] = None
    teacher_steps: Optional[int] = None
    nproc: int = 2
    teacher_nproc: int = 2
    seed: int = 1234
    overrides: tuple[str, ...] = ()
    teacher_overrides: tuple[str, ...] = ()
    student_overrides: tuple[str, ...] = ()
    rebuild_teacher: bool = False
    eval_windows: Optional[int] = None
    stream: Optional[TextIO] = field(default_factory=lambda: sys.stderr, repr=False, compare=False)

    def __post_init__(self):
        unknown = [s for s in self.students if s not in STUDENTS]
        if unknown:
            raise DistillError(f"unknown demo student(s) {unknown}; choose from {sorted(STUDENTS)}")
        for key in ("steps", "teacher_steps", "eval_windows"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise DistillError(f"{key} must be > 0, got {value}")
        if self.nproc < 1 or self.teacher_nproc < 1:
            raise DistillError(f"nproc and teacher_nproc must be >= 1, got {self.nproc} and {self.teacher_nproc}")


@dataclass
class TeacherInfo:
    """A cached teacher: where it is and what it scores."""

    directory: Path
    megatron_dir: Path
    spec: dict
    vocab_size: int
    heldout_ce: Optional[float]
    train_seconds: Optional[float]
    steps: int
    reused: bool
    tokenizer_fingerprint: str = ""
    corpus_key: str = ""


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    rows: list[dict]
    teacher: TeacherInfo
    table: str
    markdown: str
    figure: Optional[Path]
    results_json: Path
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Stage bookkeeping
# ---------------------------------------------------------------------------


class _Stages:
    """Logs ``[demo i/n] name ...`` at the start and ``... done in Xs`` at the end of each stage."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds = total, 0, {}

    def run(self, name: str, what: str, fn: Callable):
        self.index += 1
        log.info("[demo %d/%d] %s: %s", self.index, self.total, name, what)
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = time.perf_counter() - t0
        log.info("[demo %d/%d] %s done in %.1fs", self.index, self.total, name, self.seconds[name])
        return out


def _resolved(path: Path, overrides: Sequence[str]) -> dict:
    from distill_plugins.recipe.load import load_recipe_data

    return load_recipe_data(path, list(overrides))


def _steps_overrides(path: Path, overrides: Sequence[str], steps: Optional[int]) -> list[str]:
    """``training.steps=N`` plus a warm-up shortened to fit (at most a tenth of the steps) when needed."""
    if steps is None:
        return []
    out = [f"training.steps={steps}"]
    warmup = int(_resolved(path, overrides).get("training", {}).get("warmup_steps", 0) or 0)
    if warmup > steps // 10:
        out.append(f"training.warmup_steps={steps // 10}")
    return out


def _recipe(path: Path, overrides: Sequence[str]):
    from distill_plugins.recipe.load import load_recipe

    recipe, _host = load_recipe(path, list(overrides))
    return recipe


# ---------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------


def run_command(cmd: Sequence[str], *, log_path: Path, stream: Optional[TextIO], env: Optional[dict] = None,
                what: str = "command") -> float:
    """Run ``cmd``, echo its output (minus known noise) to ``stream``, keep all of it in ``log_path``.

    Returns the wall time in seconds.

    Raises:
        DistillError: non-zero exit; the message has the last lines of output and the log path.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque = deque(maxlen=25)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1, errors="replace")
        assert proc.stdout is not None
        try:
            skip_source_line = False
            for line in proc.stdout:
                logf.write(line)
                tail.append(line.rstrip("\n"))
                quiet = any(p in line for p in QUIET_WARNINGS) or set(line.strip()) == {"*"}  # torchrun's banner
                if skip_source_line and line.startswith(" ") and not quiet:
                    quiet = True  # the source line printed under a filtered warning
                skip_source_line = quiet and "Warning" in line
                if stream is not None and not quiet:
                    stream.write(line)
                    stream.flush()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    seconds = time.perf_counter() - t0
    if code != 0:
        last = "\n".join(f"    {t}" for t in tail)
        raise DistillError(f"{what} failed with exit code {code} after {seconds:.0f}s; full output in {log_path}; "
                           f"last lines:\n{last}")
    return seconds


def distill_run_command(recipe: Path, overrides: Sequence[str], *, nproc: int) -> list[str]:
    """``distill run RECIPE overrides...``, under ``torchrun --standalone`` when ``nproc > 1``."""
    run = ["-m", "distill_plugins.cli", "run", str(recipe), *overrides]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *run]
    return [sys.executable, *run]


def _subprocess_env(settings: "DemoSettings") -> dict:
    """The runs' environment: unbuffered output, and ``$DISTILL_CACHE`` when the demo uses its own cache."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if settings.cache is not None:
        env["DISTILL_CACHE"] = str(settings.cache)  # the runs' data loaders read the same corpus
    return env


# ---------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------


def teacher_cache_key(resolved: dict, tokenizer_fingerprint: str, corpus_key: str) -> str:
    """A short hash of what determines the teacher: its resolved recipe (minus where it writes), tokenizer, corpus."""
    recipe = {k: v for k, v in resolved.items() if k not in ("output_dir", "checkpoint", "description")}
    blob = json.dumps({"recipe": recipe, "tokenizer": tokenizer_fingerprint, "corpus": corpus_key,
                       "version": TEACHER_CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _model_spec_dict(spec) -> dict:
    from distill_plugins.config import to_plain

    return to_plain(spec)


def export_teacher(run_dir: Path, megatron_dir: Path, spec, *, vocab_size: int, windows=None) -> Optional[float]:
    """Save a teacher run's final weights as a megatron distributed checkpoint (with ``distill_model.json``).

    The checkpoint (:func:`distill_plugins.models.megatron_ckpt.save_megatron_checkpoint`)
    loads under any TP/PP through ``teacher.megatron``. Returns the teacher's
    held-out CE on ``windows`` (None without windows).
    """
    from distill_plugins.models.megatron_ckpt import save_megatron_checkpoint
    from distill_plugins.demo.evaluate import EVAL_PARALLEL, build_eval_model, evaluation_context, load_run_weights, model_ce

    with evaluation_context():
        model = build_eval_model(spec, vocab_size=vocab_size, who="teacher")
        load_run_weights(model, run_dir)
        tmp = megatron_dir.with_name(megatron_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_megatron_checkpoint(model, str(tmp), make_vocab_size_divisible_by=EVAL_PARALLEL.make_vocab_size_divisible_by)
        if megatron_dir.exists():
            shutil.rmtree(megatron_dir)
        os.replace(tmp, megatron_dir)
        return model_ce(model, windows, vocab_size=vocab_size) if windows is not None else None


def ensure_teacher(settings: DemoSettings, *, tokenizer_fingerprint: str, corpus_key: str, vocab_size: int,
                   test_prefix: str) -> TeacherInfo:
    """The cached teacher for ``settings``, training and exporting it first when missing."""
    from distill_plugins.data.cache import cache_dir, file_lock, write_json_atomic
    from distill_plugins.demo.evaluate import heldout_windows

    recipe_path = settings.recipes_dir / "teacher.yaml"
    overrides = list(settings.overrides) + list(settings.teacher_overrides) + [f"seed={settings.seed}"]
    overrides += _steps_overrides(recipe_path, overrides, settings.teacher_steps)
    resolved = _resolved(recipe_path, overrides)
    key = teacher_cache_key(resolved, tokenizer_fingerprint, corpus_key)
    root = Path(settings.cache) if settings.cache is not None else cache_dir()
    directory = root / "demo" / f"teacher-{key}"
    manifest_path = directory / "teacher.json"
    with file_lock(directory / ".lock"):
        if manifest_path.is_file() and not settings.rebuild_teacher:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            log.info("reusing the cached teacher %s (held-out CE %.3f, trained %d steps in %.0fs); "
                     "--rebuild-teacher retrains it", directory, manifest.get("heldout_ce") or float("nan"),
                     manifest["steps"], manifest.get("train_seconds") or 0.0)
            return TeacherInfo(directory=directory, megatron_dir=directory / "megatron", spec=manifest["spec"],
                               vocab_size=manifest["vocab_size"], heldout_ce=manifest.get("heldout_ce"),
                               train_seconds=manifest.get("train_seconds"), steps=manifest["steps"], reused=True,
                               tokenizer_fingerprint=tokenizer_fingerprint, corpus_key=corpus_key)
        if manifest_path.exists():
            manifest_path.unlink()
        run_dir = directory / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_overrides = overrides + [f"output_dir={run_dir}"]
        recipe = _recipe(recipe_path, run_overrides)
        log.info("training the teacher (%d layers x %d hidden, %d steps, %d process(es)); it is cached in %s",
                 recipe.student.num_layers, recipe.student.hidden_size, recipe.training.steps,
                 settings.teacher_nproc, directory)
        seconds = run_command(distill_run_command(recipe_path, run_overrides, nproc=settings.teacher_nproc),
                              log_path=run_dir / "console.log", stream=settings.stream, env=_subprocess_env(settings),
                              what="teacher pretraining")
        windows = heldout_windows(test_prefix, recipe.data.seq_length, max_windows=settings.eval_windows)
        ce = export_teacher(run_dir, directory / "megatron", recipe.student, vocab_size=vocab_size, windows=windows)
        spec = _model_spec_dict(recipe.student)
        manifest = {"spec": spec, "vocab_size": vocab_size, "heldout_ce": ce, "train_seconds": seconds,
                    "steps": recipe.training.steps, "key": key, "tokenizer": tokenizer_fingerprint,
                    "corpus": corpus_key, "recipe": resolved}
        write_json_atomic(manifest_path, manifest)
        log.info("teacher ready: held-out CE %.3f after %d steps (%.0fs)", ce, recipe.training.steps, seconds)
        return TeacherInfo(directory=directory, megatron_dir=directory / "megatron", spec=spec, vocab_size=vocab_size,
                           heldout_ce=ce, train_seconds=seconds, steps=recipe.training.steps, reused=False,
                           tokenizer_fingerprint=tokenizer_fingerprint, corpus_key=corpus_key)


# ---------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------


def student_overrides(settings: DemoSettings, name: str, teacher: TeacherInfo) -> list[str]:
    """Overrides of one student run: output dir, seed, steps, the cached teacher's shape and weights."""
    out = list(settings.overrides) + list(settings.student_overrides)
    out += [f"output_dir={settings.output_dir / f'student_{name}'}", f"seed={settings.seed}",
            f"parallel.tensor={settings.nproc}"]
    out += _steps_overrides(settings.recipes_dir / STUDENTS[name][0], out, settings.steps)
    if name != "ce":
        spec = teacher.spec
        for key in ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "max_position_embeddings", "tie_embeddings"):
            if spec.get(key) is not None:
                out.append(f"teacher.{key}={json.dumps(spec[key])}")
        out.append(f"teacher.megatron={teacher.megatron_dir}")
    return out


def train_student(settings: DemoSettings, name: str, teacher: TeacherInfo) -> dict:
    """Run one student; returns ``{"name", "run_dir", "seconds", "steps", "spec"}``."""
    recipe_file, _label = STUDENTS[name]
    recipe_path = settings.recipes_dir / recipe_file
    overrides = student_overrides(settings, name, teacher)
    recipe = _recipe(recipe_path, overrides)
    run_dir = Path(recipe.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: never mix two runs
    log.info("student %r: %s, %d steps of %d x %d tokens, TP=%d", name, recipe.objective.name
             if recipe.loss.kd_weight > 0 else "cross-entropy only", recipe.training.steps,
             recipe.training.global_batch_size, recipe.data.seq_length, recipe.parallel.tensor)
    seconds = run_command(distill_run_command(recipe_path, overrides, nproc=settings.nproc),
                          log_path=run_dir / "console.log", stream=settings.stream, env=_subprocess_env(settings),
                          what=f"student {name!r}")
    return {"name": name, "run_dir": run_dir, "seconds": seconds, "steps": recipe.training.steps,
            "spec": recipe.student, "objective": recipe.objective, "seq_length": recipe.data.seq_length}


# ---------------------------------------------------------------------------
# Evaluation and report
# ---------------------------------------------------------------------------


def evaluate_students(teacher: TeacherInfo, students: list[dict], *, test_prefix: str, seq_length: int,
                      max_windows: Optional[int]) -> list[dict]:
    """Held-out rows: the teacher's own, then one per student (table order)."""
    from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint
    from distill_plugins.recipe.schema import ModelSpec
    from distill_plugins.demo.evaluate import build_eval_model, compare_models, evaluation_context, heldout_windows, load_run_weights

    windows = heldout_windows(test_prefix, seq_length, max_windows=max_windows)
    rows = []
    with evaluation_context():
        tmodel = build_eval_model(ModelSpec(**teacher.spec), vocab_size=teacher.vocab_size, who="teacher")
        load_megatron_checkpoint(tmodel, str(teacher.megatron_dir))
        for s in students:
            model = build_eval_model(s["spec"], vocab_size=teacher.vocab_size, who="student")
            load_run_weights(model, s["run_dir"])
            m = compare_models(model, tmodel, windows, vocab_size=teacher.vocab_size)
            rows.append({"name": s["name"], "label": STUDENTS[s["name"]][1], "ce": m.ce, "fkl": m.fkl, "rkl": m.rkl,
                         "top1": m.top1, "train_seconds": s["seconds"], "steps": s["steps"],
                         "run_dir": str(s["run_dir"]), "tokens": m.tokens, "teacher_ce": m.teacher_ce})
        teacher_ce = rows[0]["teacher_ce"] if rows else None
    size = f"{teacher.spec['num_layers']}x{teacher.spec['hidden_size']}"
    rows.insert(0, {"name": "teacher", "label": f"teacher ({size}, {teacher.steps} steps)", "ce": teacher_ce
                    if teacher_ce is not None else teacher.heldout_ce, "fkl": 0.0, "rkl": 0.0, "top1": 1.0,
                    "train_seconds": teacher.train_seconds, "steps": teacher.steps, "tokens": len(windows) * seq_length})
    return rows


TABLE_COLUMNS = [
    ("label", "model", "{}"),
    ("ce", "held-out CE (nats/token)", "{:.3f}"),
    ("fkl", "KL(teacher||student)", "{:.3f}"),
    ("rkl", "KL(student||teacher)", "{:.3f}"),
    ("top1", "top-1 agreement", "{:.1%}"),
    ("train_seconds", "train time (s)", "{:.0f}"),
]


def verdict(rows: list[dict]) -> list[str]:
    """Lines saying whether each distilled student beats the CE-only student on held-out CE."""
    by = {r["name"]: r for r in rows}
    if "ce" not in by:
        return []
    lines = []
    for name in ("fkl", "csd"):
        if name in by:
            diff = by["ce"]["ce"] - by[name]["ce"]
            word = "lower" if diff > 0 else "NOT lower"
            lines.append(f"{STUDENTS[name][1]}: held-out CE {by[name]['ce']:.3f}, {word} than CE-only "
                         f"{by['ce']['ce']:.3f} (by {diff:+.3f} nats)")
    return lines


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run the whole demo (module docstring); returns the table and where everything was written."""
    from distill_plugins.data.embedded import build_embedded
    from distill_plugins.data.tokenizer import load_tokenizer
    from distill_plugins.demo import report

    t_start = time.perf_counter()
    if not (settings.recipes_dir / "teacher.yaml").is_file():
        raise DistillError(f"demo recipes not found in {settings.recipes_dir}: run from a source checkout "
                           "(make demo) or pass --recipes DIR pointing at recipes/demo")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(5)
    base = _recipe(settings.recipes_dir / STUDENTS[settings.students[0]][0] if settings.students
                   else settings.recipes_dir / "teacher.yaml", list(settings.overrides))
    tok_spec = base.data.tokenizer or "embedded:4096"
    if not str(tok_spec).startswith("embedded:"):
        raise DistillError(f"the demo uses the embedded corpus; data.tokenizer must be embedded:N, got {tok_spec!r}")
    vocab = int(str(tok_spec).split(":", 1)[1])

    def data_stage():
        built = build_embedded(vocab, cache=settings.cache)
        tok = load_tokenizer(built.tokenizer_path)
        splits = built.corpus.manifest["splits"]
        log.info("corpus: %s (%s); tokenizer %s (%d tokens)", built.corpus.directory,
                 ", ".join(f"{s} {splits[s]['documents']} docs" for s in ("train", "valid", "test")),
                 built.tokenizer_path.name, tok.vocab_size)
        return built, tok

    built, tok = stages.run("data", "stdlib-docstring corpus, BPE tokenizer, indexed datasets (cached)", data_stage)
    test_prefix = built.prefixes["test"]
    teacher = stages.run("teacher", "pretrain the teacher on the corpus, or reuse the cached one", lambda: ensure_teacher(
        settings, tokenizer_fingerprint=tok.fingerprint(), corpus_key=built.corpus.directory.name,
        vocab_size=tok.vocab_size, test_prefix=test_prefix))

    def students_stage():
        out = []
        for i, name in enumerate(settings.students, 1):
            log.info("[demo] student %d/%d: %s", i, len(settings.students), STUDENTS[name][1])
            out.append(train_student(settings, name, teacher))
        return out

    trained = stages.run("students", f"train {len(settings.students)} students with the same steps, tokens and seed",
                         students_stage)
    seq_length = trained[0]["seq_length"] if trained else base.data.seq_length
    rows = stages.run("evaluate", "held-out CE and KL to the teacher on the test split (TP=1)", lambda: evaluate_students(
        teacher, trained, test_prefix=test_prefix, seq_length=seq_length, max_windows=settings.eval_windows))

    def report_stage():
        table = report.plain_table(rows, TABLE_COLUMNS)
        markdown = report.markdown_table(rows, TABLE_COLUMNS)
        figure = None
        curves = {STUDENTS[s["name"]][1]: s["run_dir"] / "metrics.jsonl" for s in trained}
        if curves:
            final = {r["label"]: (r["steps"], r["ce"]) for r in rows if r["name"] != "teacher"}
            figure = report.plot_loss_curves(curves, output_dir / "loss_curves.png",
                                             title="demo students (same steps, tokens and seed)",
                                             reference={"teacher held-out CE": rows[0]["ce"]} if rows[0]["ce"] else None,
                                             final=final)
        return table, markdown, figure

    table, markdown, figure = stages.run("report", "table and loss-curve PNG", report_stage)
    seconds = time.perf_counter() - t_start
    results_json = output_dir / "demo_results.json"
    payload = {"rows": rows, "stage_seconds": stages.seconds, "seconds": seconds, "verdict": verdict(rows),
               "teacher": {"directory": str(teacher.directory), "reused": teacher.reused, "spec": teacher.spec},
               "figure": str(figure) if figure else None}
    results_json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    (output_dir / "demo_results.md").write_text(markdown + "\n\n" + "\n".join(f"- {v}" for v in verdict(rows)) + "\n",
                                                encoding="utf-8")
    return DemoResult(rows=rows, teacher=teacher, table=table, markdown=markdown, figure=figure,
                      results_json=results_json, seconds=seconds, stage_seconds=stages.seconds)
