"""`distill export` writes the tokenizer's bos/eos ids into config.json and readable weight files (issue 17 item 18).

One spawned process (megatron's parallel state stays out of the test process):
a tiny Llama student is saved as a megatron checkpoint and exported three times
through the CLI: with a tokenizer, without one, and with a tokenizer larger than
the model's vocabulary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat

import pytest

pytest.importorskip("safetensors")

from distill_plugins.testing.distributed import run_distributed  # noqa: E402

VOCAB = 320


def _tokenizer_dir(root: str, extra: int) -> str:
    """A HF tokenizer directory: a 300-token byte-level BPE, plus `<s>` and ``extra`` more special tokens."""
    from distill_plugins.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"def f{i}(x): return x + {i}" for i in range(100)], 300, min_frequency=1)
    backend = tok.backend
    backend.add_special_tokens(["<s>"] + [f"<extra_{i}>" for i in range(extra)])
    path = os.path.join(root, f"tok_{extra}")
    os.makedirs(path)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "<|endoftext|>"}, fh)
    return path


def export_body(rank, world_size, root):
    import megatron.core.models.gpt  # noqa: F401  (import megatron before the CPU layer patches torch.cuda)

    from distill_plugins.cli import main
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.models.build import build_gpt_model
    from distill_plugins.models.megatron_ckpt import save_megatron_checkpoint
    from distill_plugins.recipe.schema import ModelSpec, ParallelSpec

    os.umask(0o022)
    enable_cpu_mode()
    parallel = ParallelSpec(make_vocab_size_divisible_by=16)
    dps.initialize(parallel, cpu=True, seed=3)
    spec = ModelSpec(arch="llama", num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                     max_position_embeddings=32)
    ckpt = os.path.join(root, "ckpt")
    save_megatron_checkpoint(build_gpt_model(spec, parallel, vocab_size=VOCAB, cpu=True), ckpt,
                             make_vocab_size_divisible_by=16, family="llama")
    dps.destroy()
    codes = {}
    for name, extra in (("with_tokenizer", 0), ("too_large", 30)):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            codes[name] = main(["export", ckpt, os.path.join(root, name), "--tokenizer-dir",
                                _tokenizer_dir(root, extra), "--cpu"])
        codes[f"{name}_stderr"] = err.getvalue()
    codes["no_tokenizer"] = main(["export", ckpt, os.path.join(root, "no_tokenizer"), "--cpu"])
    return codes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("export_meta"))
    (codes,) = run_distributed(export_body, 1, args=(root,))
    return root, codes


def test_config_has_the_tokenizers_bos_and_eos(exported):
    root, codes = exported
    assert codes["with_tokenizer"] == 0
    config = json.load(open(os.path.join(root, "with_tokenizer", "config.json"), encoding="utf-8"))
    assert config["vocab_size"] == VOCAB
    assert (config["bos_token_id"], config["eos_token_id"]) == (300, 0)  # <s> added after the BPE; <|endoftext|> is 0
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoConfig.from_pretrained(os.path.join(root, "with_tokenizer"))
    assert (loaded.bos_token_id, loaded.eos_token_id) == (300, 0)
    assert os.path.isfile(os.path.join(root, "with_tokenizer", "tokenizer.json"))


def test_without_a_tokenizer_the_ids_are_null_not_family_defaults(exported):
    root, codes = exported
    assert codes["no_tokenizer"] == 0
    config = json.load(open(os.path.join(root, "no_tokenizer", "config.json"), encoding="utf-8"))
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # Llama's default would be 1 and 2


def test_weight_and_metadata_files_have_normal_permissions(exported):
    root, _ = exported
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        mode = stat.S_IMODE(os.stat(os.path.join(root, "with_tokenizer", name)).st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}"  # safetensors alone writes 0600


def test_tokenizer_larger_than_the_model_is_refused_before_writing(exported):
    root, codes = exported
    assert codes["too_large"] == 2
    assert "has 331 tokens but the model's vocab_size is 320" in codes["too_large_stderr"]
    assert not os.path.exists(os.path.join(root, "too_large", "model.safetensors"))
