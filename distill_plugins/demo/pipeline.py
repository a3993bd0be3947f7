"""The demos: corpus or task, tokenizer, cached teacher, students, held-out table.

Design
------
:func:`run_demo` runs five stages, logging each with its wall time. Two tasks
(:data:`TASKS`, ``DemoSettings.task``) share the stages:

``docstrings`` (the default; ``make demo``, ``distill demo``): language modelling on
the embedded stdlib-docstring corpus.

``instruct`` (``distill demo --task instruct``): the embedded instruction task
(prompt = a function's signature and module, response = the first paragraph of
its docstring; split by package, :mod:`distill_plugins.data.embedded_instruct`),
every loss on response tokens only.

1. **data**: ``docstrings``: the corpus, its byte-level BPE and megatron indexed
   datasets (:func:`distill_plugins.data.embedded.build_embedded`).
   ``instruct``: the task's JSONL splits and the ``embedded:N`` tokenizer of
   the base recipe, and the tokenized held-out test split
   (:func:`instruct_heldout`). Built once, cached under ``$DISTILL_CACHE`` or
   ``~/.cache/distill_plugins``.
2. **teacher**: ``<recipes>/teacher.yaml`` (cross-entropy training of a 4x128
   model: pretraining on the corpus, or supervised fine-tuning on the task's
   train responses, from random weights: never on the docstring corpus, whose
   documents contain the task's held-out responses) run by ``distill run`` in a
   subprocess, unless the cache already holds a teacher for the same resolved
   recipe, tokenizer and data (:func:`teacher_cache_key`). The final weights
   are converted to a megatron ``dist_checkpointing`` checkpoint
   (layout-independent, so students load it at any TP through
   ``teacher.megatron``) and ``teacher.json`` (written last, the completion
   marker) records its held-out cross-entropy (response CE for ``instruct``).
3. **students**: ``<recipes>/student_*.yaml`` of the task
   (:attr:`DemoTask.students`), each under ``torchrun --standalone
   --nproc-per-node N`` (N = TP = 2 by default) with the same steps, tokens,
   seed and learning rate: a baseline without teacher (CE on the corpus, or SFT
   on the responses) and distilled students. Every subprocess's output is
   streamed (the engine logs per-step progress) and kept in ``<run>/console.log``.
4. **evaluate**: every model rebuilt at TP=1 in this process
   (:mod:`distill_plugins.demo.evaluate`) and scored on the whole held-out
   test split. ``docstrings``: cross-entropy, KL(teacher || student), reverse
   KL, top-1 agreement. ``instruct``: response CE, the two KLs on the reference
   response tokens, and ROUGE-L F1 of greedy answers (:func:`instruct_metrics`).
5. **report**: the table on stdout, ``demo_results.{md,json}`` and
   ``loss_curves.png`` in the output directory.

Nothing from the teacher initialises a student: the students start from the
same random initialisation (same seed), so differences come from the training
signal alone.

Recipes are found in ``distill_plugins/demo/recipes/<folder>`` (package data:
links to ``recipes/demo`` and ``recipes/demo_instruct`` of the source tree, so
an installed package carries them), else in the source tree.

Usage::

    from distill_plugins.demo.pipeline import DemoSettings, run_demo
    result = run_demo(DemoSettings(output_dir="runs/demo"))
    result.rows            # one dict per model: name, ce, fkl, rkl, top1, train_seconds
    result = run_demo(DemoSettings(task="instruct", output_dir="runs/demo_instruct"))
    result.rows            # name, response_ce, fkl, rkl, rouge_l, train_seconds
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

from distill_plugins.config import to_plain
from distill_plugins.data.cache import cache_dir, file_lock, write_json_atomic
from distill_plugins.data.embedded import build_embedded
from distill_plugins.data.embedded_corpus import build_embedded_corpus
from distill_plugins.data.embedded_instruct import build_embedded_instruct
from distill_plugins.data.instruct import (InstructSource, is_embedded_instruct, read_records, render_records,
                                           select_template, tokenize_rendered)
from distill_plugins.data.tokenizer import Tokenizer, embedded_tokenizer, load_tokenizer
from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.recipe.load import load_recipe, load_recipe_data
from distill_plugins.recipe.schema import ModelSpec

log = get_logger(__name__)

PathLike = Union[str, Path]

#: The docstring demo's students: short name -> (recipe file, table label).
STUDENTS: dict[str, tuple[str, str]] = {
    "ce": ("student_ce.yaml", "student, CE only (no teacher)"),
    "fkl": ("student_fkl.yaml", "student, forward KL"),
    "csd": ("student_csd.yaml", "student, CSD"),
}

#: The instruction demo's students (response tokens only).
INSTRUCT_STUDENTS: dict[str, tuple[str, str]] = {
    "sft": ("student_sft.yaml", "student, SFT only (no teacher)"),
    "fkl": ("student_fkl.yaml", "student, forward KL"),
    "srkl": ("student_srkl.yaml", "student, skew reverse KL"),
    "csd": ("student_csd.yaml", "student, CSD (T,S)"),
}


@dataclass(frozen=True)
class DemoTask:
    """One demo task.

    Attributes:
        name: ``docstrings`` or ``instruct``.
        folder: recipes folder (``recipes/<folder>`` of the source tree).
        students: short name -> (recipe file, table label), in table order.
        baseline: the student trained without a teacher.
        teacher_prefix: cache folder prefix of its teachers (``<cache>/demo/<prefix>-<key>``).
    """

    name: str
    folder: str
    students: dict
    baseline: str
    teacher_prefix: str


TASKS: dict[str, DemoTask] = {
    "docstrings": DemoTask("docstrings", "demo", STUDENTS, "ce", "teacher"),
    "instruct": DemoTask("instruct", "demo_instruct", INSTRUCT_STUDENTS, "sft", "instruct-teacher"),
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

#: Package data: ``recipes/<folder>`` next to this module (links into the source tree's ``recipes/``).
PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"
#: The source tree's ``recipes/`` (checkouts whose package data was not built).
SOURCE_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def default_recipes_dir(task: str = "docstrings") -> Path:
    """The recipes of ``task``: the package's copy (:data:`PACKAGED_RECIPES`), else the source tree's."""
    if task not in TASKS:
        raise DistillError(f"unknown demo task {task!r}; choose from {sorted(TASKS)}")
    folder = TASKS[task].folder
    packaged = PACKAGED_RECIPES / folder
    if (packaged / "teacher.yaml").is_file():
        return packaged
    return SOURCE_RECIPES / folder


@dataclass(frozen=True)
class DemoSettings:
    """What :func:`run_demo` does; every field has a command-line flag in :mod:`distill_plugins.cli.demo`.

    Attributes:
        output_dir: where runs, the table and the PNG go.
        task: ``docstrings`` (language modelling, the default) or ``instruct`` (:data:`TASKS`).
        cache: cache root (default ``$DISTILL_CACHE`` or ``~/.cache/distill_plugins``).
        recipes_dir: folder with ``teacher.yaml`` and ``student_*.yaml`` (None: the task's, :func:`default_recipes_dir`).
        students: which students to train, from the task's students, in table order (None: all).
        steps: optimizer steps of every student (None: the recipes' value).
        teacher_steps: optimizer steps of the teacher (None: the recipe's value).
        nproc: processes per student run (the students' TP size; 2 = the CSD-at-TP=2 demo).
        teacher_nproc: processes of the teacher run (data-parallel; 2 = faster than one 2-thread process on 2 cores).
        seed: seed of every run (students share it).
        overrides: ``key=value`` overrides for every run (teacher and students).
        teacher_overrides: ``key=value`` overrides for the teacher run only (its model is ``student.*`` there).
        student_overrides: ``key=value`` overrides for the students only.
        rebuild_teacher: retrain the teacher even when a cached one exists.
        eval_windows: at most this many held-out windows (docstrings) or examples (instruct); None: the whole split.
        max_new_tokens: ``instruct``: longest greedy answer scored by ROUGE-L.
        stream: where subprocess output is echoed (None: not echoed; always in console.log).
    """

    output_dir: Path = Path("runs/demo")
    task: str = "docstrings"
    cache: Optional[Path] = None
    recipes_dir: Optional[Path] = None
    students: Optional[tuple[str, ...]] = None
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
    max_new_tokens: int = 64
    stream: Optional[TextIO] = field(default_factory=lambda: sys.stderr, repr=False, compare=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise DistillError(f"unknown demo task {self.task!r}; choose from {sorted(TASKS)}")
        task = TASKS[self.task]
        if self.students is None:
            object.__setattr__(self, "students", tuple(task.students))
        if self.recipes_dir is None:
            object.__setattr__(self, "recipes_dir", default_recipes_dir(self.task))
        unknown = [s for s in self.students if s not in task.students]
        if unknown:
            raise DistillError(f"unknown student(s) {unknown} for the {self.task} demo; choose from "
                               f"{sorted(task.students)}")
        for key in ("steps", "teacher_steps", "eval_windows"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise DistillError(f"{key} must be > 0, got {value}")
        if self.nproc < 1 or self.teacher_nproc < 1:
            raise DistillError(f"nproc and teacher_nproc must be >= 1, got {self.nproc} and {self.teacher_nproc}")
        if self.max_new_tokens < 1:
            raise DistillError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def demo_task(self) -> DemoTask:
        return TASKS[self.task]


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
    task: str = "docstrings"


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
# Data of the instruction task
# ---------------------------------------------------------------------------


@dataclass
class InstructData:
    """The instruction task as the demo and the benchmark use it.

    Attributes:
        tokenizer: the base recipe's ``embedded:N`` tokenizer.
        test: the tokenized, truncated held-out test split.
        task_key: the task's cache folder name (part of the teacher's cache key).
        seq_length: ``data.seq_length`` of the base recipe.
    """

    tokenizer: Tokenizer
    test: InstructSource
    task_key: str
    seq_length: int


def instruct_heldout(recipe, *, cache: Optional[PathLike] = None, split: str = "test") -> InstructData:
    """Tokenizer and held-out split of a ``data.kind: instruct, paths: [embedded]`` recipe, from ``cache``.

    The same rendering, tokenization and truncation as the training runs
    (:func:`distill_plugins.data.instruct.instruct_source`), reading the cache
    given here rather than ``$DISTILL_CACHE``.

    Raises:
        DistillError: the recipe is not the embedded instruction task or its tokenizer is not ``embedded:N``.
    """
    data = recipe.data
    if not is_embedded_instruct(data):
        raise DistillError(f"the instruction demo uses the embedded task (data.kind: instruct, paths: [embedded]); "
                           f"the recipe has kind {data.kind!r}, paths {list(data.paths)}")
    spec = str(data.tokenizer or "embedded:4096")
    if not spec.startswith("embedded:"):
        raise DistillError(f"the instruction demo uses an embedded tokenizer (data.tokenizer: embedded:N), got {spec!r}")
    tok = embedded_tokenizer(int(spec.split(":", 1)[1]), corpus=build_embedded_corpus(cache))
    built = build_embedded_instruct(cache)
    records = read_records([str(built.jsonl[split])], prompt_key=data.prompt_key, response_key=data.response_key,
                           messages_key=data.messages_key)
    template = select_template(spec, data.template, records)
    examples = tokenize_rendered(render_records(records, template), tok)
    source = InstructSource(examples, seq_length=data.seq_length, seed=recipe.seed, split=split,
                            truncation=data.truncation, pad_id=tok.eos_id,
                            description=f"embedded instruction task {built.directory.name}")
    return InstructData(tokenizer=tok, test=source, task_key=built.directory.name, seq_length=data.seq_length)


# ---------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------


def teacher_cache_key(resolved: dict, tokenizer_fingerprint: str, corpus_key: str) -> str:
    """A short hash of what determines the teacher: its resolved recipe (minus where it writes), tokenizer, corpus."""
    recipe = {k: v for k, v in resolved.items() if k not in ("output_dir", "checkpoint", "description")}
    blob = json.dumps({"recipe": recipe, "tokenizer": tokenizer_fingerprint, "corpus": corpus_key,
                       "version": TEACHER_CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def export_teacher(run_dir: Path, megatron_dir: Path, spec, *, vocab_size: int, windows=None,
                   heldout: Optional[Callable] = None) -> Optional[float]:
    """Save a teacher run's final weights as a megatron distributed checkpoint (with ``distill_model.json``).

    The checkpoint (:func:`distill_plugins.models.megatron_ckpt.save_megatron_checkpoint`)
    loads under any TP/PP through ``teacher.megatron``. Returns the teacher's
    held-out CE: ``heldout(model)`` when given, else the CE on ``windows``
    (None with neither).
    """
    # megatron (through evaluate and megatron_ckpt) is imported only when a model is built: `distill --help`
    # and `distill demo --help` import this module through distill_plugins.cli.demo
    from distill_plugins.demo.evaluate import EVAL_PARALLEL, build_eval_model, evaluation_context, load_run_weights, model_ce
    from distill_plugins.models.megatron_ckpt import save_megatron_checkpoint

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
        if heldout is not None:
            return heldout(model)
        return model_ce(model, windows, vocab_size=vocab_size) if windows is not None else None


def ensure_teacher(settings: DemoSettings, *, tokenizer_fingerprint: str, corpus_key: str, vocab_size: int,
                   test_prefix: Optional[str] = None, heldout: Optional[Callable] = None) -> TeacherInfo:
    """The cached teacher for ``settings``, training and exporting it first when missing.

    Args:
        settings: the teacher recipe is ``settings.recipes_dir / "teacher.yaml"``.
        tokenizer_fingerprint, corpus_key: with the resolved recipe, the cache key (:func:`teacher_cache_key`).
        vocab_size: the tokenizer's size.
        test_prefix: indexed test split whose windows give the held-out CE (the docstring task).
        heldout: ``model -> held-out CE``, used instead of ``test_prefix`` (the instruction task: response CE).
    """
    recipe_path = settings.recipes_dir / "teacher.yaml"
    overrides = list(settings.overrides) + list(settings.teacher_overrides) + [f"seed={settings.seed}"]
    overrides += _steps_overrides(recipe_path, overrides, settings.teacher_steps)
    resolved = _resolved(recipe_path, overrides)
    key = teacher_cache_key(resolved, tokenizer_fingerprint, corpus_key)
    root = Path(settings.cache) if settings.cache is not None else cache_dir()
    directory = root / "demo" / f"{settings.demo_task.teacher_prefix}-{key}"
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
                              what="teacher training")
        windows = None
        if heldout is None and test_prefix is not None:
            from distill_plugins.demo.evaluate import heldout_windows  # megatron: see export_teacher

            windows = heldout_windows(test_prefix, recipe.data.seq_length, max_windows=settings.eval_windows)
        ce = export_teacher(run_dir, directory / "megatron", recipe.student, vocab_size=vocab_size, windows=windows,
                            heldout=heldout)
        spec = to_plain(recipe.student)
        manifest = {"spec": spec, "vocab_size": vocab_size, "heldout_ce": ce, "train_seconds": seconds,
                    "steps": recipe.training.steps, "key": key, "tokenizer": tokenizer_fingerprint,
                    "corpus": corpus_key, "recipe": resolved}
        write_json_atomic(manifest_path, manifest)
        log.info("teacher ready: held-out CE %s after %d steps (%.0fs)", f"{ce:.3f}" if ce is not None else "n/a",
                 recipe.training.steps, seconds)
        return TeacherInfo(directory=directory, megatron_dir=directory / "megatron", spec=spec, vocab_size=vocab_size,
                           heldout_ce=ce, train_seconds=seconds, steps=recipe.training.steps, reused=False,
                           tokenizer_fingerprint=tokenizer_fingerprint, corpus_key=corpus_key)


def instruct_response_ce(data: InstructData, *, max_examples: Optional[int] = None) -> Callable:
    """``model -> response CE`` on ``data.test`` (the ``heldout`` of :func:`ensure_teacher` for the instruction task)."""

    def score(model) -> float:
        from distill_plugins.demo.evaluate import instruct_metrics  # megatron: see export_teacher

        return instruct_metrics(model, None, data.test, data.tokenizer, vocab_size=data.tokenizer.vocab_size,
                                generate_answers=False, max_examples=max_examples).response_ce

    return score


def ensure_instruct_teacher(settings: DemoSettings, data: InstructData) -> TeacherInfo:
    """:func:`ensure_teacher` for the instruction task (cache key includes the task's version folder)."""
    tok = data.tokenizer
    return ensure_teacher(settings, tokenizer_fingerprint=tok.fingerprint(), corpus_key=data.task_key,
                          vocab_size=tok.vocab_size, heldout=instruct_response_ce(data, max_examples=settings.eval_windows))


# ---------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------


def teacher_overrides(teacher: TeacherInfo) -> list[str]:
    """``teacher.*`` overrides loading the cached teacher: its shape and ``teacher.megatron``."""
    out = []
    spec = teacher.spec
    for key in ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "max_position_embeddings", "tie_embeddings"):
        if spec.get(key) is not None:
            out.append(f"teacher.{key}={json.dumps(spec[key])}")
    out.append(f"teacher.megatron={teacher.megatron_dir}")
    return out


def student_overrides(settings: DemoSettings, name: str, teacher: TeacherInfo) -> list[str]:
    """Overrides of one student run: output dir, seed, steps, the cached teacher's shape and weights."""
    out = list(settings.overrides) + list(settings.student_overrides)
    out += [f"output_dir={settings.output_dir / f'student_{name}'}", f"seed={settings.seed}",
            f"parallel.tensor={settings.nproc}"]
    out += _steps_overrides(settings.recipes_dir / settings.demo_task.students[name][0], out, settings.steps)
    if name != settings.demo_task.baseline:
        out += teacher_overrides(teacher)
    return out


def train_student(settings: DemoSettings, name: str, teacher: TeacherInfo) -> dict:
    """Run one student; returns ``{"name", "run_dir", "seconds", "steps", "spec", ...}``."""
    recipe_file, _label = settings.demo_task.students[name]
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
    """Held-out rows of the docstring task: the teacher's own, then one per student (table order)."""
    # megatron: see export_teacher
    from distill_plugins.demo.evaluate import build_eval_model, compare_models, evaluation_context, heldout_windows, load_run_weights
    from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint

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


def load_teacher_model(teacher: TeacherInfo):
    """The cached teacher as a TP=1 eval model (inside :func:`distill_plugins.demo.evaluate.evaluation_context`)."""
    # megatron: see export_teacher
    from distill_plugins.demo.evaluate import build_eval_model
    from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint

    model = build_eval_model(ModelSpec(**teacher.spec), vocab_size=teacher.vocab_size, who="teacher")
    load_megatron_checkpoint(model, str(teacher.megatron_dir))
    return model


def instruct_row(metrics) -> dict:
    """The table fields of :class:`~distill_plugins.demo.evaluate.InstructMetrics`."""
    return {"response_ce": metrics.response_ce, "fkl": metrics.fkl, "rkl": metrics.rkl, "rouge_l": metrics.rouge_l,
            "examples": metrics.examples, "response_tokens": metrics.response_tokens,
            "answer_tokens": metrics.answer_tokens, "samples": list(metrics.samples)}


def evaluate_instruct_students(teacher: TeacherInfo, students: list[dict], data: InstructData, *,
                               max_examples: Optional[int], max_new_tokens: int) -> list[dict]:
    """Held-out rows of the instruction task: the teacher's, then one per student (table order).

    Columns (:func:`distill_plugins.demo.evaluate.instruct_metrics`): response
    CE, KL(teacher || student) and KL(student || teacher) on the reference
    response tokens, ROUGE-L F1 (x100) of greedy answers.
    """
    # megatron: see export_teacher
    from distill_plugins.demo.evaluate import build_eval_model, evaluation_context, instruct_metrics, load_run_weights

    vocab = data.tokenizer.vocab_size
    kw = dict(vocab_size=vocab, max_new_tokens=max_new_tokens, max_examples=max_examples)
    rows = []
    with evaluation_context():
        tmodel = load_teacher_model(teacher)
        tm = instruct_metrics(tmodel, None, data.test, data.tokenizer, **kw)
        size = f"{teacher.spec['num_layers']}x{teacher.spec['hidden_size']}"
        rows.append({"name": "teacher", "label": f"teacher ({size}, {teacher.steps} steps SFT)",
                     **instruct_row(tm), "fkl": 0.0, "rkl": 0.0, "train_seconds": teacher.train_seconds,
                     "steps": teacher.steps})
        for s in students:
            model = build_eval_model(s["spec"], vocab_size=vocab, who="student")
            load_run_weights(model, s["run_dir"])
            m = instruct_metrics(model, tmodel, data.test, data.tokenizer, **kw)
            rows.append({"name": s["name"], "label": INSTRUCT_STUDENTS[s["name"]][1], **instruct_row(m),
                         "train_seconds": s["seconds"], "steps": s["steps"], "run_dir": str(s["run_dir"])})
    return rows


TABLE_COLUMNS = [
    ("label", "model", "{}"),
    ("ce", "held-out CE (nats/token)", "{:.3f}"),
    ("fkl", "KL(teacher||student)", "{:.3f}"),
    ("rkl", "KL(student||teacher)", "{:.3f}"),
    ("top1", "top-1 agreement", "{:.1%}"),
    ("train_seconds", "train time (s)", "{:.0f}"),
]

INSTRUCT_COLUMNS = [
    ("label", "model", "{}"),
    ("response_ce", "response CE (nats/token)", "{:.3f}"),
    ("fkl", "KL(teacher||student)", "{:.3f}"),
    ("rkl", "KL(student||teacher)", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.2f}"),
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


def instruct_verdict(rows: list[dict]) -> list[str]:
    """Lines comparing the teacher and each distilled student with the SFT-only student on ROUGE-L and response CE."""
    by = {r["name"]: r for r in rows}
    if "sft" not in by:
        return []
    base = by["sft"]
    lines = []
    for name in ["teacher"] + [n for n in INSTRUCT_STUDENTS if n != "sft"]:
        if name not in by:
            continue
        r = by[name]
        label = r["label"] if name == "teacher" else INSTRUCT_STUDENTS[name][1]
        d_rouge, d_ce = r["rouge_l"] - base["rouge_l"], base["response_ce"] - r["response_ce"]
        lines.append(f"{label}: ROUGE-L {r['rouge_l']:.2f} ({d_rouge:+.2f} vs SFT-only {base['rouge_l']:.2f}), "
                     f"response CE {r['response_ce']:.3f} ({'lower' if d_ce > 0 else 'NOT lower'} by {d_ce:+.3f})")
    return lines


def _docstring_data(settings: DemoSettings, base):
    tok_spec = base.data.tokenizer or "embedded:4096"
    if not str(tok_spec).startswith("embedded:"):
        raise DistillError(f"the demo uses the embedded corpus; data.tokenizer must be embedded:N, got {tok_spec!r}")
    built = build_embedded(int(str(tok_spec).split(":", 1)[1]), cache=settings.cache)
    tok = load_tokenizer(built.tokenizer_path)
    splits = built.corpus.manifest["splits"]
    log.info("corpus: %s (%s); tokenizer %s (%d tokens)", built.corpus.directory,
             ", ".join(f"{s} {splits[s]['documents']} docs" for s in ("train", "valid", "test")),
             built.tokenizer_path.name, tok.vocab_size)
    return built, tok


def _instruct_data(settings: DemoSettings, base) -> InstructData:
    data = instruct_heldout(base, cache=settings.cache)
    st = data.test.stats
    log.info("instruction task %s: test split %d examples (%d truncated from the left), %d response tokens; "
             "tokenizer %s (%d tokens)", data.task_key, st["examples"], st["truncated"], st["response_tokens"],
             data.tokenizer.name, data.tokenizer.vocab_size)
    return data


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run the whole demo (module docstring); returns the table and where everything was written."""
    # matplotlib and megatron (report imports evaluate): see export_teacher
    from distill_plugins.demo import report

    t_start = time.perf_counter()
    task = settings.demo_task
    instruct = task.name == "instruct"
    if not (settings.recipes_dir / "teacher.yaml").is_file():
        raise DistillError(f"demo recipes not found in {settings.recipes_dir} (no teacher.yaml); pass --recipes DIR "
                           f"pointing at recipes/{task.folder} of a source checkout")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(5)
    base = _recipe(settings.recipes_dir / task.students[settings.students[0]][0] if settings.students
                   else settings.recipes_dir / "teacher.yaml", list(settings.overrides))

    if instruct:
        data = stages.run("data", "embedded instruction task, tokenizer, held-out test split (cached)",
                          lambda: _instruct_data(settings, base))
        teacher = stages.run("teacher", "fine-tune the teacher on the task's responses, or reuse the cached one",
                             lambda: ensure_instruct_teacher(settings, data))
    else:
        built, tok = stages.run("data", "stdlib-docstring corpus, BPE tokenizer, indexed datasets (cached)",
                                lambda: _docstring_data(settings, base))
        test_prefix = built.prefixes["test"]
        teacher = stages.run("teacher", "pretrain the teacher on the corpus, or reuse the cached one",
                             lambda: ensure_teacher(settings, tokenizer_fingerprint=tok.fingerprint(),
                                                    corpus_key=built.corpus.directory.name,
                                                    vocab_size=tok.vocab_size, test_prefix=test_prefix))

    def students_stage():
        out = []
        for i, name in enumerate(settings.students, 1):
            log.info("[demo] student %d/%d: %s", i, len(settings.students), task.students[name][1])
            out.append(train_student(settings, name, teacher))
        return out

    trained = stages.run("students", f"train {len(settings.students)} students with the same steps, tokens and seed",
                         students_stage)
    if instruct:
        rows = stages.run("evaluate", "response CE, KL to the teacher and ROUGE-L of greedy answers on the test "
                          "split (TP=1)", lambda: evaluate_instruct_students(
                              teacher, trained, data, max_examples=settings.eval_windows,
                              max_new_tokens=settings.max_new_tokens))
        columns, lines, ce_key = INSTRUCT_COLUMNS, instruct_verdict(rows), "response_ce"
    else:
        seq_length = trained[0]["seq_length"] if trained else base.data.seq_length
        rows = stages.run("evaluate", "held-out CE and KL to the teacher on the test split (TP=1)",
                          lambda: evaluate_students(teacher, trained, test_prefix=test_prefix, seq_length=seq_length,
                                                    max_windows=settings.eval_windows))
        columns, lines, ce_key = TABLE_COLUMNS, verdict(rows), "ce"

    def report_stage():
        table = report.plain_table(rows, columns)
        markdown = report.markdown_table(rows, columns)
        figure = None
        curves = {task.students[s["name"]][1]: s["run_dir"] / "metrics.jsonl" for s in trained}
        if curves:
            final = {r["label"]: (r["steps"], r[ce_key]) for r in rows if r["name"] != "teacher"}
            what = "teacher held-out response CE" if instruct else "teacher held-out CE"
            figure = report.plot_loss_curves(curves, output_dir / "loss_curves.png",
                                             title=f"{task.name} demo students (same steps, tokens and seed)",
                                             reference={what: rows[0][ce_key]} if rows[0][ce_key] else None,
                                             final=final,
                                             ce_title=("student cross-entropy on response tokens" if instruct
                                                       else None))
        return table, markdown, figure

    table, markdown, figure = stages.run("report", "table and loss-curve PNG", report_stage)
    seconds = time.perf_counter() - t_start
    results_json = output_dir / "demo_results.json"
    payload = {"task": task.name, "rows": rows, "stage_seconds": stages.seconds, "seconds": seconds, "verdict": lines,
               "teacher": {"directory": str(teacher.directory), "reused": teacher.reused, "spec": teacher.spec},
               "figure": str(figure) if figure else None}
    results_json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    (output_dir / "demo_results.md").write_text(markdown + "\n\n" + "\n".join(f"- {v}" for v in lines) + "\n",
                                                encoding="utf-8")
    return DemoResult(rows=rows, teacher=teacher, table=table, markdown=markdown, figure=figure,
                      results_json=results_json, seconds=seconds, stage_seconds=stages.seconds, task=task.name)
