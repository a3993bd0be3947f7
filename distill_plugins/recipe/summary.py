"""Human-readable summary of a validated recipe, printed by ``distill check``."""

from __future__ import annotations

from typing import Iterator

from .schema import ModelSpec, Recipe


def estimate_parameters(spec: ModelSpec, vocab_size: int) -> int:
    """Parameter count of a llama- or gpt2-style model from its shape keys (real vocab, no padding)."""
    h, layers = spec.hidden_size, spec.num_layers
    heads = spec.num_attention_heads
    groups = spec.num_query_groups or heads
    head_dim = h // heads
    qkv = h * (heads + 2 * groups) * head_dim
    attn_out = h * h
    if spec.arch == "llama":
        ffn = spec.ffn_hidden_size or default_ffn_hidden_size(spec)
        mlp = 3 * h * ffn
        norms = 2 * h
        bias = (heads + 2 * groups) * head_dim if spec.add_qkv_bias else 0
        per_layer = qkv + attn_out + mlp + norms + bias
        extra = h  # final norm
    else:
        ffn = spec.ffn_hidden_size or 4 * h
        mlp = 2 * h * ffn + ffn + h
        norms = 4 * h
        bias = (heads + 2 * groups) * head_dim + h
        per_layer = qkv + attn_out + mlp + norms + bias
        extra = 2 * h + spec.max_position_embeddings * h
    embed = vocab_size * h
    output = 0 if spec.tie_embeddings else vocab_size * h
    return layers * per_layer + extra + embed + output


def default_ffn_hidden_size(spec: ModelSpec) -> int:
    """4h for gpt2; 8/3 h rounded up to a multiple of 64 for llama."""
    if spec.ffn_hidden_size:
        return spec.ffn_hidden_size
    if spec.arch == "gpt2":
        return 4 * spec.hidden_size
    return -(-(8 * spec.hidden_size // 3) // 64) * 64


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor: int) -> int:
    """megatron's padding: the next multiple of ``divisible_by * tensor``."""
    multiple = divisible_by * tensor
    return -(-vocab_size // multiple) * multiple


def _model_line(role: str, spec: ModelSpec, recipe: Recipe) -> str:
    if spec.hf or spec.megatron:
        return f"{role}: from {'hf' if spec.hf else 'megatron'} {spec.hf or spec.megatron}"
    vocab = spec.vocab_size
    size = f", ~{estimate_parameters(spec, vocab) / 1e6:.2f}M parameters" if vocab else ""
    padded = (f", padded vocab {padded_vocab_size(vocab, recipe.parallel.make_vocab_size_divisible_by, recipe.parallel.tensor)}"
              if vocab else "")
    return (f"{role}: {spec.arch}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
            f"{spec.num_attention_heads} heads{size}{padded}")


def _part(spec) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
    return f"{spec.name}({params})" if params else spec.name


def describe_recipe(recipe: Recipe, host) -> Iterator[str]:
    """Lines describing the models, layout, parts and plugins of ``recipe``."""
    if recipe.description:
        yield recipe.description.strip()
    yield _model_line("student", recipe.student, recipe)
    yield _model_line("teacher", recipe.teacher, recipe)
    p = recipe.parallel
    yield f"layout: TP={p.tensor} PP={p.pipeline} (DP = world size / {p.tensor * p.pipeline}), device={recipe.device}"
    t = recipe.training
    yield (f"training: {t.steps} steps, global batch {t.global_batch_size}, micro batch {t.micro_batch_size}, "
           f"seq {recipe.data.seq_length}, lr {t.lr}")
    yield (f"parts: objective={_part(recipe.objective)} selector={_part(recipe.selector)} "
           f"temperature={_part(recipe.temperature)} aligner={_part(recipe.aligner)}")
    yield f"plugins: {', '.join(host.plugin_lines())}"
