"""Generation from megatron-core GPTModels (distill_plugins.engine.generate).

One 4-process gloo group runs three layouts in turn on the same layout-independent
weights (``init_deterministic``): TP=1 (DP=4), TP=2 (DP=2), TP=2 x PP=2. Only the
ranks of the first data-parallel replica generate (the others would repeat the same
work). Checked there: greedy tokens equal across layouts; seeded sampling
reproducible, seed-dependent and equal across layouts; top-k=1 equals greedy; a
row's output does not depend on the other rows (greedy, and sampled with per-row
seeds); left-padded tensor input equals list input; EOS stops a row and the loop;
padded vocabulary columns are never chosen; ranks given different prompts get an
error; and tiny Hugging Face Llama / GPT-2 models imported with the project's
importer generate the tokens ``transformers``' ``generate`` does. Config checks run
in-process.
"""

from __future__ import annotations

import os

import pytest
import torch

from distill_plugins.engine.generate import GenerationConfig, _filter_logits, prompts_from_padded, select_tokens
from distill_plugins.errors import DistillError
from distill_plugins.testing.distributed import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 100
HF_VOCAB = 96
NEW = 10
LAYOUTS = ((1, 1), (2, 1), (2, 2))
PROMPTS = [[3, 41, 7, 88, 15], [52, 9], [77, 4, 60, 23, 31, 8, 19], [12, 70, 5]]
HF_PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
HF_EOS, HF_PAD = 2, 0
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9)


# ---------------------------------------------------------------------------
# Rank body (module level: spawned processes import it)
# ---------------------------------------------------------------------------


def _spec(arch: str):
    from distill_plugins.recipe.schema import ModelSpec

    if arch == "llama":  # RoPE, GQA, untied output layer
        return ModelSpec(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                         vocab_size=VOCAB, max_position_embeddings=64)
    return ModelSpec(arch="gpt2", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                     max_position_embeddings=64, tie_embeddings=True)  # learned positions, tied output


def _layout_checks(model, tp, pp, out):
    """Everything generated from one deterministic model under one layout."""
    from distill_plugins.engine.generate import generate

    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW))
    out["greedy"] = greedy.tokens
    out["sampled"] = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, seed=1, **SAMPLED)).tokens
    if (tp, pp) == (2, 1):
        return
    out["sampled_again"] = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, seed=1, **SAMPLED)).tokens
    out["sampled_seed2"] = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, seed=2, **SAMPLED)).tokens
    out["top_k1"] = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, temperature=0.7, top_k=1,
                                                              seed=3)).tokens
    out["alone"] = [generate(model, [p], GenerationConfig(max_new_tokens=NEW)).tokens[0] for p in PROMPTS]
    seeds = [11, 12, 13, 14]
    cfg = GenerationConfig(max_new_tokens=NEW, **SAMPLED)
    out["seeded_batch"] = generate(model, PROMPTS, cfg, seeds=seeds).tokens
    out["seeded_alone"] = [generate(model, [p], cfg, seeds=[s]).tokens[0] for p, s in zip(PROMPTS, seeds)]
    width = max(len(p) for p in PROMPTS)
    padded = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out["left_padded"] = generate(model, padded, GenerationConfig(max_new_tokens=NEW), attention_mask=mask).tokens
    # EOS: the third greedy token of row 0 ends generation; every id as EOS ends the loop after one token.
    eos = int(greedy.tokens[0, 2])
    stop = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=99))
    out["eos"] = (eos, stop.tokens, stop.lengths, stop.finished)
    every = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_token_id=list(range(VOCAB))))
    out["eos_all"] = (every.steps, every.lengths, every.finished)
    seen = []
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=4), progress=seen.append)
    out["progress"] = [(p.step, p.max_steps, p.new_tokens, p.rows_done) for p in seen]
    model.train()
    generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=2))
    out["training_restored"] = model.training
    model.eval()


def _poison_padded_vocab(model):
    """Add 1e4 to the padded columns of the output layer's (gathered) logits on the last stage."""
    from distill_plugins.models.build import model_layout

    vocab = model_layout(model).vocab_size
    if not model.post_process:
        return

    def hook(module, args, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., vocab:] += 1e4
        return logits, bias

    model.output_layer.register_forward_hook(hook)


def generate_body(rank, world_size, root):
    import megatron.core.models.gpt  # noqa: F401  (import megatron before the CPU layer patches torch.cuda)

    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.engine.generate import generate
    from distill_plugins.models import build
    from distill_plugins.models.hf_import import import_hf_model
    from distill_plugins.recipe.schema import ParallelSpec

    enable_cpu_mode()
    results = {}
    for tp, pp in LAYOUTS:
        parallel = ParallelSpec(tensor=tp, pipeline=pp, make_vocab_size_divisible_by=16)
        ctx = dps.initialize(parallel, cpu=True, seed=7)
        if ctx.dp_rank == 0:
            for arch in ("llama", "gpt2"):
                model = build.build_gpt_model(_spec(arch), parallel, cpu=True)
                build.init_deterministic(model, seed=5, std=0.3)  # wide logits: clear greedy margins
                model.eval()
                out = results.setdefault((arch, tp, pp), {})
                out["padded_vocab"] = build.model_layout(model).padded_vocab_size
                _layout_checks(model, tp, pp, out)
                if (tp, pp) == (2, 2):
                    _poison_padded_vocab(model)
                    out["poisoned_greedy"] = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW)).tokens
                    out["poisoned_sampled"] = generate(model, PROMPTS, GenerationConfig(
                        max_new_tokens=NEW, seed=1, **SAMPLED)).tokens
            if (tp, pp) == (2, 1):
                model = build.build_gpt_model(_spec("llama"), parallel, cpu=True)
                build.init_deterministic(model, seed=5, std=0.3)
                # Sequence parallelism as a GPU build sets it (megatron's torch norms refuse to be built
                # with it on CPU): generation must switch it off for the call and restore it after.
                model.config.sequence_parallel = True
                for module in model.modules():
                    for attr in ("sequence_parallel", "scatter_to_sequence_parallel"):
                        if hasattr(module, attr):
                            setattr(module, attr, True)
                results["sequence_parallel"] = (
                    generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW)).tokens,
                    model.config.sequence_parallel and model.embedding.scatter_to_sequence_parallel
                    and model.decoder.layers[0].self_attention.linear_qkv.sequence_parallel)
                mine = PROMPTS if ctx.tp_rank == 0 else PROMPTS[:2] + [[5, 6]] + PROMPTS[3:]
                try:
                    generate(model, mine, GenerationConfig(max_new_tokens=2))
                    results["mismatch_error"] = None
                except DistillError as exc:
                    results["mismatch_error"] = str(exc)
            if (tp, pp) == (2, 2):
                for family in ("llama", "gpt2"):
                    model, _ = import_hf_model(os.path.join(root, family), parallel, cpu=True)
                    res = generate(model, HF_PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_token_id=HF_EOS,
                                                                       pad_token_id=HF_PAD))
                    results[("hf", family)] = (res.tokens, res.lengths, res.finished)
        dps.destroy()
    return results


# ---------------------------------------------------------------------------
# Hugging Face references (parent process)
# ---------------------------------------------------------------------------


def _make_hf_model(family: str, path: str):
    common = dict(vocab_size=HF_VOCAB, bos_token_id=1, eos_token_id=HF_EOS, pad_token_id=HF_PAD,
                  initializer_range=0.2)  # wide logits: greedy margins far above float noise
    torch.manual_seed(0 if family == "llama" else 1)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=64, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, **common))
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping changes the tokens
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


def _hf_generate(model):
    """transformers' greedy generate on the left-padded batch: new tokens [b, NEW] and the smallest top-2 gap."""
    width = max(len(p) for p in HF_PROMPTS)
    ids = torch.tensor([[HF_PAD] * (width - len(p)) + p for p in HF_PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in HF_PROMPTS])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         eos_token_id=HF_EOS, pad_token_id=HF_PAD, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)
    top2 = scores.topk(2, dim=-1).values
    return out.sequences[:, width:], float((top2[..., 0] - top2[..., 1]).min())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("generate"))
    hf = {}
    for family in ("llama", "gpt2"):
        hf[family] = _hf_generate(_make_hf_model(family, os.path.join(root, family)))
    per_rank = run_distributed(generate_body, world_size=4, args=(root,))
    return hf, per_rank


def _r(runs, arch, layout, key, rank=0):
    return runs[1][rank][(arch, *layout)][key]


ARCHS = ("llama", "gpt2")


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equal_across_layouts(runs, arch):
    ref = _r(runs, arch, (1, 1), "greedy")
    assert ref.shape == (len(PROMPTS), NEW)
    assert _r(runs, arch, (1, 1), "padded_vocab") == 112 and _r(runs, arch, (2, 2), "padded_vocab") == 128
    for layout in ((2, 1), (2, 2)):
        assert torch.equal(_r(runs, arch, layout, "greedy"), ref), layout


@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_parallel_rank_returns_the_same_tokens(runs, arch):
    for layout, ranks in (((2, 1), (0, 1)), ((2, 2), (0, 1, 2, 3))):
        for key in ("greedy", "sampled"):
            first = _r(runs, arch, layout, key, ranks[0])
            for rank in ranks[1:]:
                assert torch.equal(_r(runs, arch, layout, key, rank), first), (layout, key, rank)


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling(runs, arch):
    for layout in ((1, 1), (2, 2)):
        sampled = _r(runs, arch, layout, "sampled")
        assert torch.equal(_r(runs, arch, layout, "sampled_again"), sampled), "same seed, same tokens"
        assert not torch.equal(_r(runs, arch, layout, "sampled_seed2"), sampled), "another seed, other tokens"
        assert not torch.equal(sampled, _r(runs, arch, layout, "greedy")), "sampling differs from greedy"
    # the same seeds give the same samples under every layout (same weights, same per-row generators)
    for layout in ((2, 1), (2, 2)):
        assert torch.equal(_r(runs, arch, layout, "sampled"), _r(runs, arch, (1, 1), "sampled")), layout


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_1_is_greedy(runs, arch):
    for layout in ((1, 1), (2, 2)):
        assert torch.equal(_r(runs, arch, layout, "top_k1"), _r(runs, arch, layout, "greedy"))


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_do_not_depend_on_the_batch(runs, arch):
    for layout in ((1, 1), (2, 2)):
        greedy = _r(runs, arch, layout, "greedy")
        for i, alone in enumerate(_r(runs, arch, layout, "alone")):
            assert torch.equal(alone, greedy[i]), (layout, i)
        seeded = _r(runs, arch, layout, "seeded_batch")
        for i, alone in enumerate(_r(runs, arch, layout, "seeded_alone")):
            assert torch.equal(alone, seeded[i]), (layout, i)
        assert torch.equal(_r(runs, arch, layout, "left_padded"), greedy)


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_stops_rows_and_the_loop(runs, arch):
    for layout in ((1, 1), (2, 2)):
        greedy = _r(runs, arch, layout, "greedy")
        eos, tokens, lengths, finished = _r(runs, arch, layout, "eos")
        for i in range(len(PROMPTS)):
            row = greedy[i].tolist()
            n = row.index(eos) + 1 if eos in row else NEW
            assert int(lengths[i]) == n and bool(finished[i]) == (eos in row), (layout, i)
            assert tokens[i, :n].tolist() == row[:n]
            assert all(t == 99 for t in tokens[i, n:].tolist()), "pad after the stop"
        assert int(lengths[0]) <= 3 and bool(finished[0])
        steps, lengths, finished = _r(runs, arch, layout, "eos_all")
        longest, shortest = max(map(len, PROMPTS)), min(map(len, PROMPTS))
        assert steps == longest - shortest + 1, "the loop ends when the last row has its one token"
        assert lengths.tolist() == [1] * len(PROMPTS) and bool(finished.all())


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_vocabulary_is_never_chosen(runs, arch):
    """Padded logit columns raised by 1e4 (a forward hook on the output layer) change nothing."""
    assert torch.equal(_r(runs, arch, (2, 2), "poisoned_greedy"), _r(runs, arch, (2, 2), "greedy"))
    assert torch.equal(_r(runs, arch, (2, 2), "poisoned_sampled"), _r(runs, arch, (2, 2), "sampled"))
    assert int(_r(runs, arch, (2, 2), "greedy").max()) < VOCAB


def test_progress_and_mode(runs):
    progress = _r(runs, "llama", (1, 1), "progress")
    longest, shortest = max(map(len, PROMPTS)), min(map(len, PROMPTS))
    assert [p[0] for p in progress] == list(range(1, len(progress) + 1))
    assert progress[-1][1] == longest - shortest + 4 and progress[-1][2] == 4 * len(PROMPTS)
    assert progress[-1][3] == len(PROMPTS)
    assert _r(runs, "llama", (2, 2), "training_restored") is True


def test_sequence_parallel_is_off_during_generation_and_restored(runs):
    for rank in (0, 1):
        tokens, restored = runs[1][rank]["sequence_parallel"]
        assert torch.equal(tokens, _r(runs, "llama", (2, 1), "greedy"))
        assert restored


def test_ranks_with_different_prompts_get_an_error(runs):
    for rank in (0, 1):
        msg = runs[1][rank]["mismatch_error"]
        assert msg is not None and "different prompts" in msg


# ---------------------------------------------------------------------------
# Hugging Face greedy equality
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_imported_hf_model_generates_like_transformers(runs, family):
    hf, per_rank = runs
    want, margin = hf[family]
    assert margin > 1e-3, "the reference's greedy choices must not be near-ties"
    for rank in range(4):  # TP=2 x PP=2: every rank holds the result
        tokens, lengths, finished = per_rank[rank][("hf", family)]
        assert tokens.shape[1] <= NEW
        got = torch.full((len(HF_PROMPTS), NEW), HF_PAD, dtype=torch.long)
        got[:, : tokens.shape[1]] = tokens
        assert torch.equal(got, want), (rank, got.tolist(), want.tolist())
        for i in range(len(HF_PROMPTS)):
            assert bool(finished[i]) == (HF_EOS in want[i, : int(lengths[i])].tolist())


# ---------------------------------------------------------------------------
# In-process: config checks and the sampling filters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(eos_token_id=[-1]), "eos_token_id"),
])
def test_config_errors_name_the_value(kwargs, needle):
    with pytest.raises(DistillError, match=needle.replace("[", r"\[")):
        GenerationConfig(**kwargs)


def test_prompts_from_padded():
    tokens = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompts_from_padded(tokens, mask) == [[5, 6], [7, 8, 9, 1]]
    with pytest.raises(DistillError, match="not left-padded"):
        prompts_from_padded(tokens, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    z = _filter_logits(probs.log(), GenerationConfig(temperature=1.0, top_p=0.8))
    assert torch.isfinite(z).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    z = _filter_logits(probs.log(), GenerationConfig(temperature=1.0, top_p=0.81))
    assert torch.isfinite(z).tolist() == [[True, True, True, False]]
    z = _filter_logits(probs.log(), GenerationConfig(temperature=1.0, top_p=0.2))
    assert torch.isfinite(z).tolist() == [[True, False, False, False]]  # the first token is always kept
    z = _filter_logits(probs.log()[:, [2, 0, 3, 1]], GenerationConfig(temperature=1.0, top_k=2))
    assert torch.isfinite(z).tolist() == [[False, True, False, True]]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    cfg = GenerationConfig(temperature=2.0, top_k=3)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    picks = select_tokens(logits, cfg, gens, torch.ones(4000, dtype=torch.bool))
    freq = torch.bincount(picks, minlength=4).float() / 4000
    want = torch.softmax(torch.tensor([1.0, 0.5, 0.0]), 0)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], want, atol=0.03, rtol=0)


def test_config_from_sequence_source_sampling():
    from distill_plugins import SamplingParams

    cfg = GenerationConfig.from_sampling(SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12),
                                         eos_token_id=[2, 3], seed=4)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.seed) == (0.7, 0.9, 5, 12, 4)
    assert cfg.eos_ids == (2, 3) and cfg.pad_id == 2 and not cfg.greedy
    assert GenerationConfig.from_sampling(SamplingParams(temperature=0.0)).greedy
