"""Build megatron-core GPTModels from recipe specs, and load full weights into TP/PP shards.

Design
------
A :class:`~distill_plugins.recipe.schema.ModelSpec` plus a
:class:`~distill_plugins.recipe.schema.ParallelSpec` fully describe one
pipeline stage of a model: :func:`build_gpt_model` turns them into a
``megatron.core.models.gpt.GPTModel`` for *this* rank's stage (embedding on the
first stage, output layer on the last, its share of layers in between).

Architectures (``ModelSpec.arch``):

* ``llama``: RMSNorm, SwiGLU MLP (``gated_linear_unit`` + SiLU), RoPE, GQA
  (``num_query_groups``), no linear biases (``add_qkv_bias`` for Qwen2-style),
  tied or untied embeddings.
* ``gpt2``: LayerNorm, GeLU (tanh approximation, as GPT-2), learned absolute
  positions, biases on every linear layer.

Layer specs: megatron's local spec (``get_gpt_layer_local_spec``) on CPU and
whenever transformer-engine is not importable; the transformer-engine spec on
GPU when ``transformer_engine`` imports (imported lazily).

Padded vocabulary: ``ceil(V / (divisible_by * TP)) * divisible_by * TP``
(:func:`padded_vocab_size`); the extra rows are zero and the loss masks them.

Pipeline split (:func:`pipeline_layer_split`): ``num_layers`` spread over the PP
stages as evenly as possible. Student and teacher are split independently, so a
4-layer student and a 6-layer teacher on PP=2 hold 2+2 and 3+3 layers. Uneven
splits (5 layers on PP=2 -> 3+2) use megatron's ``pipeline_model_parallel_layout``.
A model needs at least one layer per stage.

Full-weight convention (:func:`load_full_state_dict`, used by HF import and by
:func:`init_deterministic`): the names and shapes of a TP=1, PP=1 GPTModel built
with the *local* spec, with global layer numbers, and vocabulary tensors holding
the *real* vocabulary (``[V, h]``, unpadded). That means:

* ``self_attention.linear_qkv.weight`` is megatron's fused layout: for each of the
  ``ng`` query groups, its ``np/ng`` query heads, then its key head, then its value
  head, each ``head_dim`` rows: ``[ng * (np/ng + 2) * d, h]``;
* ``mlp.linear_fc1.weight`` of a gated MLP is ``[gate; up]`` (``[2 * ffn, h]``);
  each half is sharded separately over TP, as megatron does;
* ``output_layer.weight`` is absent when embeddings are tied;
* transformer-engine's fused norm names are mapped to the local names
  (:func:`canonical_name`), so one full dict loads into either spec.

Prerequisites: megatron's ``parallel_state`` must be initialised (see
:mod:`distill_plugins.engine.process_groups`), and on a CPU-only machine the
CPU layer must be on (:func:`distill_plugins.engine.cpu.enable_cpu_mode`).

Usage::

    from distill_plugins.models import build as models
    model = models.build_gpt_model(spec, parallel, vocab_size=32000, cpu=True)
    models.load_full_state_dict(model, full_tensors)          # dict or callable
    models.init_deterministic(model, seed=1234)               # layout-independent random init
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.models.hf_mapping import partition_dim
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec, padded_vocab_size
from distill_plugins.shapes import ffn_hidden_size

__all__ = [
    "ModelLayout",
    "padded_vocab_size",
    "ffn_hidden_size",
    "pipeline_layer_split",
    "transformer_config",
    "layer_spec",
    "build_gpt_model",
    "model_layout",
    "canonical_name",
    "full_param_name",
    "shard_full_tensor",
    "load_full_state_dict",
    "full_state_dict_shapes",
    "ensure_tp_attributes",
    "init_deterministic",
    "te_available",
    "gelu_tanh",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def pipeline_layer_split(num_layers: int, pipeline: int, *, who: str = "model") -> list[int]:
    """Layers per pipeline stage: as even as possible, earlier stages take the remainder.

    Raises:
        RecipeError: when there are fewer layers than stages.
    """
    if num_layers < pipeline:
        raise RecipeError(f"{who}.num_layers={num_layers} is smaller than parallel.pipeline={pipeline}: every "
                          "pipeline stage needs at least one layer; lower parallel.pipeline")
    base, extra = divmod(num_layers, pipeline)
    return [base + (1 if i < extra else 0) for i in range(pipeline)]


def te_available() -> bool:
    """Whether transformer-engine's PyTorch extension imports (lazy; False on failure)."""
    try:
        # optional extra [gpu]: transformer-engine is probed only when a model is built for GPUs
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising OSError/RuntimeError
        return False
    return True


# ---------------------------------------------------------------------------
# Config and spec
# ---------------------------------------------------------------------------


def transformer_config(
    spec: ModelSpec,
    parallel: ParallelSpec,
    *,
    precision: str = "fp32",
    use_te: bool = False,
    who: str = "model",
    **overrides: Any,
):
    """The megatron ``TransformerConfig`` for ``spec`` under ``parallel``.

    Dropout is off (distillation runs deterministic forward passes of both
    models); fused kernels are off unless ``use_te``. ``overrides`` are passed
    to ``TransformerConfig`` last (e.g. ``calculate_per_token_loss=True``).
    """
    if precision not in _DTYPES:
        raise RecipeError(f"training.precision={precision!r}: expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[precision]
    split = pipeline_layer_split(spec.num_layers, parallel.pipeline, who=who)
    layout = None
    if len(set(split)) > 1:
        layout = [
            (["embedding"] if i == 0 else []) + ["decoder"] * n + (["loss"] if i == len(split) - 1 else [])
            for i, n in enumerate(split)
        ]
    llama = spec.arch == "llama"
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=ffn_hidden_size(spec),
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups or spec.num_attention_heads,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else gelu_tanh,
        add_bias_linear=not llama,
        add_qkv_bias=(not llama) or spec.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_layout=layout,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as exc:
        raise RecipeError(f"{who}: megatron rejected the model config: {exc}") from exc


def layer_spec(spec: ModelSpec, *, use_te: bool):
    """megatron ``ModuleSpec`` of one transformer layer: TE spec if ``use_te``, else the local spec."""
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    norm = "RMSNorm" if spec.arch == "llama" else "LayerNorm"
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=norm)


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Where this rank's model shard sits; attached to built models as ``model.distill_layout``.

    Attributes:
        spec: the model spec it was built from.
        vocab_size: real vocabulary size.
        padded_vocab_size: rows of the (full) embedding / output layer after padding.
        layer_split: layers per pipeline stage.
        pp_rank, pp_size, tp_rank, tp_size: this rank's coordinates.
        use_te: whether the transformer-engine spec was used.
    """

    spec: ModelSpec
    vocab_size: int
    padded_vocab_size: int
    layer_split: tuple[int, ...]
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    use_te: bool

    @property
    def layer_offset(self) -> int:
        """Global index of this stage's first layer."""
        return sum(self.layer_split[: self.pp_rank])

    @property
    def num_local_layers(self) -> int:
        return self.layer_split[self.pp_rank]

    @property
    def pre_process(self) -> bool:
        return self.pp_rank == 0

    @property
    def post_process(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def build_gpt_model(
    spec: ModelSpec,
    parallel: ParallelSpec,
    *,
    vocab_size: Optional[int] = None,
    precision: str = "fp32",
    cpu: bool = False,
    use_te: Optional[bool] = None,
    who: str = "model",
    config_overrides: Optional[Mapping[str, Any]] = None,
):
    """Build this rank's pipeline stage of the GPTModel described by ``spec``.

    Args:
        spec: architecture and shape.
        parallel: TP/PP sizes and the vocab padding divisor. Must match the
            sizes megatron's ``parallel_state`` was initialised with.
        vocab_size: real vocabulary size; default ``spec.vocab_size``.
        precision: ``fp32``, ``bf16`` or ``fp16`` parameters.
        cpu: build for the CPU layer (forces the local spec).
        use_te: force the transformer-engine spec on/off; default: on iff not
            ``cpu`` and transformer-engine imports.
        who: recipe section name used in error messages (``student``/``teacher``).
        config_overrides: extra ``TransformerConfig`` fields.

    Returns:
        A ``GPTModel`` with ``parallel_output=True`` (logits stay vocab-parallel)
        and a :class:`ModelLayout` at ``model.distill_layout``. Parameters are
        megatron's random initialisation; see :func:`init_deterministic` and
        :func:`load_full_state_dict`.

    Raises:
        RecipeError: unknown vocabulary size, too few layers for the pipeline,
            a shape megatron rejects (e.g. heads not divisible by TP).
    """
    vocab = vocab_size if vocab_size is not None else spec.vocab_size
    if vocab is None:
        raise RecipeError(f"{who}.vocab_size is unknown: set {who}.vocab_size or data.tokenizer")
    if not ps.model_parallel_is_initialized():
        raise DistillError("megatron parallel_state is not initialised; call "
                           "distill_plugins.engine.process_groups.initialize(...) first")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (parallel.tensor, parallel.pipeline):
        raise DistillError(f"parallel_state has TP={tp}, PP={pp} but the recipe asks for "
                           f"TP={parallel.tensor}, PP={parallel.pipeline}")
    for key, value in (("num_attention_heads", spec.num_attention_heads),
                       ("num_query_groups", spec.num_query_groups or spec.num_attention_heads)):
        if value % tp:
            raise RecipeError(f"{who}.{key}={value} is not divisible by parallel.tensor={tp}")
    if use_te is None:
        use_te = (not cpu) and te_available()
    if cpu:
        use_te = False
    overrides = dict(config_overrides or {})
    config = transformer_config(spec, parallel, precision=precision, use_te=use_te, who=who, **overrides)
    padded = padded_vocab_size(vocab, parallel.make_vocab_size_divisible_by, tp)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    split = tuple(pipeline_layer_split(spec.num_layers, pp, who=who))
    try:
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(spec, use_te=use_te),
            vocab_size=padded,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pp_rank == 0,
            post_process=pp_rank == pp - 1,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_embeddings,
            position_embedding_type="rope" if spec.arch == "llama" else "learned_absolute",
            rotary_base=int(spec.rotary_base) if float(spec.rotary_base).is_integer() else spec.rotary_base,
        )
    except AssertionError as exc:
        raise RecipeError(f"{who}: megatron could not build the model: {exc}") from exc
    built = len(model.decoder.layers)
    if built != split[pp_rank]:
        raise DistillError(f"{who}: megatron built {built} layers on pipeline stage {pp_rank}, expected {split[pp_rank]}")
    model.distill_layout = ModelLayout(
        spec=spec, vocab_size=vocab, padded_vocab_size=padded, layer_split=split, pp_rank=pp_rank,
        pp_size=pp, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp, use_te=use_te,
    )
    return model


def model_layout(model: torch.nn.Module) -> ModelLayout:
    """The :class:`ModelLayout` of a model from :func:`build_gpt_model` (unwraps DDP/Float16 wrappers)."""
    m = model
    while not hasattr(m, "distill_layout"):
        if not hasattr(m, "module"):
            raise DistillError(f"{type(model).__name__} was not built by distill_plugins.models.build")
        m = m.module
    return m.distill_layout


# ---------------------------------------------------------------------------
# Full weights <-> shards
# ---------------------------------------------------------------------------

_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def canonical_name(name: str) -> str:
    """Map a transformer-engine parameter name to the local-spec name (others unchanged)."""
    for te, local in _TE_TO_LOCAL.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def full_param_name(local_name: str, layout: ModelLayout, *, tied: bool = False) -> str:
    """Name of a local parameter in the full-weight convention (global layer index, local spec).

    ``output_layer.weight`` of a tied model maps to ``embedding.word_embeddings.weight``.
    """
    name = canonical_name(local_name)
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    prefix = "decoder.layers."
    if name.startswith(prefix):
        idx, rest = name[len(prefix):].split(".", 1)
        name = f"{prefix}{int(idx) + layout.layer_offset}.{rest}"
    return name


def shard_full_tensor(full: torch.Tensor, param: torch.Tensor, *, name: str, layout: ModelLayout,
                      gated: bool = False) -> torch.Tensor:
    """This TP rank's shard of ``full`` (full-weight convention) for local parameter ``param``.

    Vocabulary tensors are zero-padded from ``[V, h]`` to ``[V_padded, h]`` first;
    gated ``fc1`` tensors shard their gate and up halves separately.

    Raises:
        DistillError: when ``full`` has the wrong shape.
    """
    full = full.detach()
    tp, rank = layout.tp_size, layout.tp_rank
    if canonical_name(name) in _VOCAB_PARAMS or name.endswith("output_layer.weight"):
        if full.shape[0] not in (layout.vocab_size, layout.padded_vocab_size):
            raise DistillError(f"{name}: full tensor has {full.shape[0]} rows, expected the vocabulary "
                               f"{layout.vocab_size} (or padded {layout.padded_vocab_size})")
        if full.shape[0] < layout.padded_vocab_size:
            pad = full.new_zeros((layout.padded_vocab_size - full.shape[0],) + tuple(full.shape[1:]))
            full = torch.cat([full, pad], dim=0)
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        out = full
    else:
        dim = param.partition_dim
        if gated:
            halves = full.chunk(2, dim=dim)
            out = torch.cat([h.chunk(tp, dim=dim)[rank] for h in halves], dim=dim)
        else:
            if full.shape[dim] % tp:
                raise DistillError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by TP={tp}")
            out = full.chunk(tp, dim=dim)[rank]
    if tuple(out.shape) != tuple(param.shape):
        raise DistillError(f"{name}: full tensor {tuple(full.shape)} gives a shard {tuple(out.shape)} but the "
                           f"parameter is {tuple(param.shape)} (TP rank {rank} of {tp})")
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "distill_layout") and hasattr(model, "module"):
        model = model.module
    return model


def full_state_dict_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full-convention name -> full shape, for the parameters this rank's stage holds."""
    model = _unwrap(model)
    layout = model_layout(model)
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    out = {}
    for name, p in model.named_parameters():
        fname = full_param_name(name, layout, tied=tied)
        shape = list(p.shape)
        if getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= layout.tp_size
        if fname in _VOCAB_PARAMS:
            shape[0] = layout.vocab_size
        out[fname] = tuple(shape)
    return out


def ensure_tp_attributes(model: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel``/``partition_dim``/``partition_stride`` where missing.

    megatron sets them in its weight initialiser, which ``perform_initialization=False``
    (used when weights are loaded anyway: HF import, megatron checkpoints) skips;
    gradient clipping, the optimizer and :func:`full_state_dict_shapes` read them. The
    dimension comes from the parameter's name
    (:func:`~distill_plugins.models.hf_mapping.partition_dim`).
    """
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    for name, param in model.named_parameters():
        dim = partition_dim(canonical_name(name))
        if dim is not None and not hasattr(param, "partition_dim"):
            set_tensor_model_parallel_attributes(param, True, dim, 2 if gated and "linear_fc1" in name else 1)


FullWeights = Union[Mapping[str, torch.Tensor], Callable[[str, tuple], Optional[torch.Tensor]]]


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: FullWeights, *, strict: bool = True) -> list[str]:
    """Copy full (unsharded, global-layer) weights into this rank's shard of ``model``.

    Args:
        model: a model from :func:`build_gpt_model` (wrappers are unwrapped).
        full: a mapping ``full name -> tensor``, or a callable
            ``(full name, full shape) -> tensor | None`` (lets callers read lazily
            or generate). Names follow the module docstring's convention.
        strict: raise when a parameter this stage holds has no full tensor.

    Returns:
        Full names of the parameters left unchanged (only when ``strict=False``).

    Raises:
        DistillError: missing tensor (strict) or a shape mismatch.
    """
    model = _unwrap(model)
    layout = model_layout(model)
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    shapes = full_state_dict_shapes(model)
    missing = []
    for name, param in model.named_parameters():
        fname = full_param_name(name, layout, tied=tied)
        if callable(full):
            tensor = full(fname, shapes[fname])
        else:
            tensor = full.get(fname)
        if tensor is None:
            missing.append(fname)
            continue
        is_fc1 = gated and canonical_name(name).endswith("mlp.linear_fc1.weight")
        shard = shard_full_tensor(tensor, param, name=name, layout=layout, gated=is_fc1)
        param.copy_(shard.to(dtype=param.dtype))
    if missing and strict:
        raise DistillError(f"full weights lack {len(missing)} parameter(s) of pipeline stage {layout.pp_rank}: "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return missing


def init_deterministic(model: torch.nn.Module, seed: int, *, std: float = 0.02) -> None:
    """Random initialisation that does not depend on the TP/PP layout.

    Every full tensor is drawn from its own CPU generator seeded by
    ``(seed, crc32(full name))`` and then sharded, so TP=2 x PP=2 and TP=1 x PP=1
    runs start from the same model (parity tests, reproducible dry runs).
    Matrices ~ N(0, std); ``linear_proj``/``linear_fc2`` ~ N(0, std / sqrt(2 L))
    (megatron's scaled init); norm weights 1; biases and padded vocab rows 0.
    """
    layout = model_layout(model)
    num_layers = layout.spec.num_layers

    def gen(name: str, shape: tuple) -> torch.Tensor:
        if name.endswith("layernorm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        g = torch.Generator(device="cpu")
        g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        s = std / math.sqrt(2.0 * num_layers) if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        return torch.randn(shape, generator=g, device="cpu") * s

    load_full_state_dict(model, gen)


@torch.no_grad()
def gather_full_tensors(model: torch.nn.Module, tensors: Optional[Mapping[str, torch.Tensor]] = None,
                        tp_group: Any = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`load_full_state_dict` for this pipeline stage: full-convention tensors.

    Args:
        model: a model from :func:`build_gpt_model`.
        tensors: local name -> local tensor to gather instead of the parameters
            themselves (e.g. gradients); default the parameters.
        tp_group: the TP group; default megatron's.

    Returns:
        full name -> full tensor (vocabulary rows cut to the real vocabulary), on every TP rank.
    """
    model = _unwrap(model)
    layout = model_layout(model)
    if tp_group is None and layout.tp_size > 1:
        tp_group = ps.get_tensor_model_parallel_group()
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    out = {}
    for name, param in model.named_parameters():
        local = (tensors[name] if tensors is not None else param).detach()
        fname = full_param_name(name, layout, tied=tied)
        if getattr(param, "tensor_model_parallel", False) and layout.tp_size > 1:
            dim = param.partition_dim
            parts = [torch.empty_like(local) for _ in range(layout.tp_size)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
            if gated and canonical_name(name).endswith("mlp.linear_fc1.weight"):
                halves = [p.chunk(2, dim=dim) for p in parts]
                full = torch.cat([torch.cat([h[0] for h in halves], dim=dim),
                                  torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
            else:
                full = torch.cat(parts, dim=dim)
        else:
            full = local.clone()
        if fname in _VOCAB_PARAMS:
            full = full[: layout.vocab_size]
        out[fname] = full
    return out
