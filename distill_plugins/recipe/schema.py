"""The recipe schema: one frozen, keyword-only dataclass per section.

A recipe is YAML whose top-level keys are the fields of :class:`Recipe`. Parts
(objective, selector, temperature, aligner) are named by their registered name,
either as a bare string (``objective: forward_kl``) or as a mapping whose
``name`` picks the part and whose other keys are that part's config
(``objective: {name: csd, w1: S, w2: S}``). docs/recipes.md documents every key.

Validation messages quote the dotted key and the bad value; ``__post_init__``
checks here cover a single section, cross-section checks live in
``recipe/validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..config import parse_dataclass, to_plain


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


def _positive(section: str, **values: Union[int, float]) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{section}.{key} must be > 0, got {value!r}")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A megatron-core GPTModel, described inline or by a checkpoint directory."""

    arch: Literal["llama", "gpt2"] = _help("layer family: llama (RMSNorm, SwiGLU, RoPE) or gpt2 (LayerNorm, GeLU, learned positions)", default="llama")
    num_layers: int = _help("transformer layers", default=2)
    hidden_size: int = _help("model width", default=64)
    ffn_hidden_size: Optional[int] = _help("MLP width; default 4*hidden (gpt2) or 8/3*hidden rounded to 64 (llama)", default=None)
    num_attention_heads: int = _help("attention heads", default=4)
    num_query_groups: Optional[int] = _help("GQA key/value heads; null = num_attention_heads", default=None)
    vocab_size: Optional[int] = _help("real vocabulary size; null = taken from the tokenizer", default=None)
    max_position_embeddings: int = _help("longest sequence the model accepts", default=512)
    rotary_base: float = _help("RoPE base (llama)", default=10000.0)
    norm_epsilon: float = _help("RMSNorm/LayerNorm epsilon", default=1e-5)
    tie_embeddings: bool = _help("share input embedding and output layer", default=False)
    add_qkv_bias: bool = _help("bias on the QKV projection (Qwen2, gpt2)", default=False)
    hf: Optional[str] = _help("local Hugging Face model directory to import (overrides the shape keys)", default=None)
    megatron: Optional[str] = _help("megatron-core distributed checkpoint to load", default=None)
    checkpoint: Optional[str] = _help("a distill_plugins run checkpoint whose student weights initialise this model", default=None)

    def __post_init__(self):
        _positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
                  num_query_groups=self.num_query_groups, vocab_size=self.vocab_size,
                  max_position_embeddings=self.max_position_embeddings)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups={groups}")
        if sum(x is not None for x in (self.hf, self.megatron, self.checkpoint)) > 1:
            raise ValueError("give at most one of hf, megatron, checkpoint")


# ---------------------------------------------------------------------------
# Parallelism, data, training, checkpoints
# ---------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """Megatron's padded vocabulary: ``ceil(V / (d * TP)) * d * TP``.

    Student and teacher use the same value (same TP, same divisor) so their
    logits share one vocab partition. The one definition every module uses.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    multiple = make_vocab_size_divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    """Model parallelism; the data-parallel size is world_size / (tensor * pipeline)."""

    tensor: int = _help("tensor-parallel size (vocabulary and heads sharded over it)", default=1)
    pipeline: int = _help("pipeline-parallel size (layers of student and teacher split over it)", default=1)
    virtual_pipeline: Optional[int] = _help("interleaved schedule chunks; not supported (must be null)", default=None)
    make_vocab_size_divisible_by: int = _help("pad the vocabulary to a multiple of this x tensor", default=128)
    sequence_parallel: bool = _help("megatron sequence parallelism (needs tensor > 1)", default=False)
    distributed_optimizer: bool = _help("shard optimizer state over data-parallel ranks", default=False)

    def __post_init__(self):
        _positive("parallel", tensor=self.tensor, pipeline=self.pipeline,
                  make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)
        if self.virtual_pipeline is not None:
            raise ValueError(f"parallel.virtual_pipeline={self.virtual_pipeline}: interleaved pipeline schedules "
                             "are not supported with a co-located teacher; remove the key")


@dataclass(frozen=True, kw_only=True)
class TeacherParallelSpec:
    """A teacher on ranks of its own (docs/separate_teacher.md); the student gets the other ranks of the job."""

    ranks: int = _help("processes (GPUs) running the teacher; the student runs on world size - ranks", default=1)
    tensor: int = _help("the teacher's tensor-parallel size", default=1)
    pipeline: int = _help("the teacher's pipeline-parallel size; its data-parallel size is "
                          "ranks / (tensor x pipeline)", default=1)
    lookahead: bool = _help("teacher runs one step ahead of the student (one more step of payload held on its "
                            "last stage); false: it computes each step after the student's previous one", default=True)

    def __post_init__(self):
        _positive("teacher_parallel", ranks=self.ranks, tensor=self.tensor, pipeline=self.pipeline)
        if self.ranks % (self.tensor * self.pipeline):
            raise ValueError(f"teacher_parallel.ranks={self.ranks} is not divisible by teacher_parallel.tensor x "
                             f"teacher_parallel.pipeline = {self.tensor} x {self.pipeline}")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where token sequences come from."""

    kind: Literal["synthetic", "jsonl", "indexed", "embedded", "instruct"] = _help(
        "synthetic (random tokens, for smoke tests), jsonl (raw text lines), indexed (megatron .bin/.idx), "
        "embedded (the built-in stdlib-docstring corpus), instruct (prompt/response or chat records; loss on "
        "responses only)", default="synthetic")
    paths: list[str] = _help("jsonl files or indexed-dataset prefixes; instruct: JSON-lines files, or [embedded] "
                             "for the built-in stdlib instruction task", default_factory=list)
    weights: Optional[list[float]] = _help("blend weights, one per path (indexed)", default=None)
    tokenizer: Optional[str] = _help("tokenizers JSON file or HF tokenizer directory", default=None)
    teacher_tokenizer: Optional[str] = _help("teacher's tokenizer when it differs (cross-tokenizer aligners: "
                                             "batches are then built from raw text, kind jsonl or embedded)",
                                             default=None)
    seq_length: int = _help("tokens per sequence", default=64)
    split: str = _help("train/valid/test split percentages for indexed data", default="98,1,1")
    text_key: str = _help("JSON key holding the text (jsonl)", default="text")
    prompt_key: str = _help("instruct: JSON key of the prompt in prompt/response records", default="prompt")
    response_key: str = _help("instruct: JSON key of the response in prompt/response records", default="response")
    messages_key: str = _help("instruct: JSON key of the message list in chat records", default="messages")
    template: Literal["auto", "chat", "plain"] = _help(
        "instruct: auto (the tokenizer directory's chat_template if it has one, else the plain template for "
        "prompt/response records), chat (require the chat template), plain (the documented plain template)",
        default="auto")
    truncation: Literal["left", "drop"] = _help(
        "instruct: a sequence longer than seq_length+1 tokens loses prompt tokens from the left (left; the "
        "response keeps its beginning) or is dropped (drop); both are counted and logged", default="left")
    num_workers: int = _help("data loader worker processes", default=0)

    def __post_init__(self):
        _positive("data", seq_length=self.seq_length)
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}")


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """Optimisation."""

    steps: int = _help("optimizer steps", default=100)
    micro_batch_size: int = _help("sequences per microbatch per data-parallel rank", default=2)
    global_batch_size: int = _help("sequences per optimizer step over all data-parallel ranks", default=8)
    lr: float = _help("peak learning rate", default=1e-3)
    min_lr: float = _help("learning rate at the end of decay", default=0.0)
    warmup_steps: int = _help("linear warm-up steps", default=0)
    lr_decay: Literal["cosine", "linear", "constant"] = _help("decay after warm-up", default="cosine")
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    adam_beta1: float = _help("Adam beta1", default=0.9)
    adam_beta2: float = _help("Adam beta2", default=0.95)
    clip_grad: float = _help("global gradient-norm clip; 0 disables", default=1.0)
    precision: Literal["fp32", "bf16", "fp16"] = _help("parameter/compute precision", default="fp32")
    initial_loss_scale: float = _help(
        "fp16 only: first dynamic loss scale (halved on each overflow, which skips that step; the losses are "
        "token sums, so gradients near the logits are O(1) and large scales overflow)", default=4096.0)
    max_consecutive_nonfinite: int = _help("stop after this many skipped (NaN/Inf) steps in a row", default=5)
    log_interval: int = _help("steps between progress lines", default=1)
    eval_interval: int = _help("steps between held-out evaluations; 0 disables", default=0)
    eval_batches: int = _help("microbatches per evaluation", default=4)
    eval_generate: int = _help(
        "instruct data: at every evaluation also answer the first N held-out (valid) examples greedily and log "
        "eval_rouge_l, eval_response_ce and eval_kl (KL(teacher||student) on the references) in a second eval line "
        "(docs/eval.md); 0 = no generation", default=0)
    eval_max_new_tokens: int = _help("answer length limit of training.eval_generate and of distill eval", default=64)

    def __post_init__(self):
        _positive("training", steps=self.steps, micro_batch_size=self.micro_batch_size,
                  global_batch_size=self.global_batch_size, lr=self.lr, log_interval=self.log_interval,
                  max_consecutive_nonfinite=self.max_consecutive_nonfinite,
                  initial_loss_scale=self.initial_loss_scale, eval_max_new_tokens=self.eval_max_new_tokens)
        if self.eval_generate < 0:
            raise ValueError(f"training.eval_generate must be >= 0 (examples answered per evaluation), got "
                             f"{self.eval_generate}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"training.micro_batch_size={self.micro_batch_size}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.warmup_steps >= self.steps):
            raise ValueError(f"training.warmup_steps={self.warmup_steps} must be 0 or less than "
                             f"training.steps={self.steps}")


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """Saving and resuming."""

    dir: Optional[str] = _help("checkpoint directory; default <output_dir>/checkpoints", default=None)
    interval: int = _help("steps between saves; 0 saves only at the end and on a signal", default=0)
    resume: str = _help("auto (newest checkpoint that loads on every rank; none there: start fresh; some there but "
                        "none loads: refuse to start), none (start fresh, existing checkpoints kept), or a checkpoint "
                        "path", default="auto")
    keep: int = _help("newest checkpoints kept; older ones are deleted", default=2)

    def __post_init__(self):
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.interval}")
        _positive("checkpoint", keep=self.keep)


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """How the distillation loss mixes with the student's own cross-entropy."""

    kd_weight: float = _help("weight of the distillation loss; 0 trains on labels only and builds no teacher",
                             default=1.0)
    ce_weight: float = _help("weight of the student's cross-entropy on labels (always logged as ce_loss)",
                             default=0.0)
    fused_output_layer: Union[Literal["auto"], bool] = _help(
        "output layer fused with the loss, no [tokens, vocab] logits (docs/objectives.md): auto = on when the "
        "objective, selector and temperature policy support it, one tokenizer and a co-located teacher (else a "
        "logged notice); true = required (an unsupported part is an error); false = materialised logits",
        default="auto")

    def __post_init__(self):
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got kd_weight={self.kd_weight}, "
                             f"ce_weight={self.ce_weight}")


@dataclass(frozen=True, kw_only=True)
class PartSpec:
    """A registered part: its kind's registry name and its config parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A resolved, validated recipe."""

    student: ModelSpec = _help("the model being trained", default_factory=ModelSpec)
    teacher: ModelSpec = _help("the frozen model distilled from", default_factory=ModelSpec)
    reference: Optional[ModelSpec] = _help("frozen reference model (AdaSPEC selector)", default=None)
    parallel: ParallelSpec = _help("model parallelism", default_factory=ParallelSpec)
    teacher_parallel: Optional[TeacherParallelSpec] = _help(
        "run the teacher on ranks of its own with its own TP/PP/DP (null: co-located on the student's ranks)",
        default=None)
    data: DataSpec = _help("training data", default_factory=DataSpec)
    training: TrainingSpec = _help("optimisation", default_factory=TrainingSpec)
    checkpoint: CheckpointSpec = _help("saving and resuming", default_factory=CheckpointSpec)
    loss: LossSpec = _help("KD/CE mix", default_factory=LossSpec)
    objective: PartSpec = _help("registered objective", default_factory=lambda: PartSpec(name="forward_kl"))
    selector: PartSpec = _help("registered token selector", default_factory=lambda: PartSpec(name="all"))
    temperature: PartSpec = _help("registered temperature policy", default_factory=lambda: PartSpec(name="constant"))
    aligner: PartSpec = _help("registered vocabulary aligner, or auto", default_factory=lambda: PartSpec(name="auto"))
    sequences: PartSpec = _help("registered sequence source: where responses come from (dataset, on_policy, mixed, "
                                "teacher_generated)", default_factory=lambda: PartSpec(name="dataset"))
    plugins: list[str] = _help("extra plugin modules to load (importable module names)", default_factory=list)
    device: Literal["cuda", "cpu"] = _help("cuda, or cpu for a dry run on gloo (docs/cpu_dry_run.md)", default="cuda")
    seed: int = _help("random seed", default=1234)
    output_dir: str = _help("run directory: resolved recipe, metrics, checkpoints", default="runs/default")
    description: str = _help("free text shown by distill check", default="")


#: recipe key -> registry kind for the part sections.
PART_SECTIONS: dict[str, str] = {
    "objective": "objective",
    "selector": "token_selector",
    "temperature": "temperature_policy",
    "aligner": "vocab_aligner",
    "sequences": "sequence_source",
}


def normalize_part(value: Any) -> Any:
    """``"csd"`` -> ``{"name": "csd"}``; mappings are copied; other values are left for validation to report."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return dict(value)
    return value


def split_parts(data: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """Recipe data with each part section as ``{name: x, params: {k: v}}`` (the schema's :class:`PartSpec`).

    A section that is neither a name nor a mapping with a ``name`` is dropped, and
    ``errors`` gets a line saying what was expected.
    """
    out = dict(data)
    for section in PART_SECTIONS:
        if section not in out:
            continue
        value = normalize_part(out[section])
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            errors.append(f"{section}: expected a registered name or a mapping with a 'name' key, got {out[section]!r}")
            out.pop(section)
            continue
        params = {k: v for k, v in value.items() if k != "name"}
        out[section] = {"name": value["name"], "params": params}
    return out


def parse_recipe(prepared: dict[str, Any]) -> tuple[Optional[Recipe], list[str]]:
    """The :class:`Recipe` of data already through :func:`split_parts` (None when it does not parse), and
    every schema error (unknown keys, types, ranges) as ``section.key: message``."""
    recipe, errors = parse_dataclass(Recipe, prepared, "recipe")
    return recipe, [e.removeprefix("recipe: ").removeprefix("recipe.") for e in errors]


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """``recipe`` as recipe-file data (part sections flattened to ``{name: x, <params>}``); loads back unchanged."""
    data = to_plain(recipe)
    for section in PART_SECTIONS:
        spec = data[section]
        data[section] = {"name": spec["name"], **spec.get("params", {})}
    return data
