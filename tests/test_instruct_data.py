"""Instruction data (distill_plugins/data/instruct.py, chat_template.py, embedded_instruct.py), on one process.

A byte-level BPE of 400 tokens is trained on standard-library docstrings, with
the ChatML special tokens ``<|im_start|>`` and ``<|im_end|>`` added; it is
saved as a tokenizer JSON file (no chat template: the plain template) and as
Hugging Face directories with and without a ``chat_template``. Records are
written to JSONL files in a temporary directory. The embedded task is built
from a few stdlib files in a temporary cache (well under a second).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_plugins.data import instruct as instruct_mod
from distill_plugins.data.chat_template import PlainTemplate, load_chat_template
from distill_plugins.data.embedded_corpus import stdlib_root
from distill_plugins.data.embedded_instruct import build_embedded_instruct, examples_of_file, first_paragraph
from distill_plugins.data.instruct import (
    InstructEvalData,
    InstructMicrobatchIterator,
    InstructSource,
    instruct_source,
    read_records,
    render_records,
    tokenize_rendered,
)
from distill_plugins.data.instruct_aligned import InstructAlignedIterator
from distill_plugins.data.iterators import MicrobatchIterator, build_data, build_eval_data
from distill_plugins.data.sources import SyntheticSource
from distill_plugins.data.text_batches import build_aligned_data, build_aligned_eval_data
from distill_plugins.data.tokenizer import load_tokenizer
from distill_plugins.errors import DistillError, InputError
from distill_plugins.recipe.schema import DataSpec, PartSpec, Recipe, TrainingSpec
from test_aligners import docstrings, train_bpe

SEQ = 96
CHATML = ("{{ bos_token }}{%- for message in messages %}\n"
          "{%- if message.role not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message.role) }}{% endif %}\n"
          "{%- if message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
          "{{ message.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}\n"
          "{%- else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}\n"
          "{%- endfor %}\n{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
#: skips unknown roles silently, as many real templates do
LENIENT = ("{%- for m in messages %}{%- if m.role in ['system', 'user', 'assistant'] %}"
           "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
           "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
CONVERSATION = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What does json.dumps return?"},
                {"role": "assistant", "content": "A JSON formatted string."},
                {"role": "user", "content": "And json.loads?"},
                {"role": "assistant", "content": "The Python object the document describes."}]


def pairs(n: int, prompt_words: int = 4) -> list[dict]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [{"prompt": f"Question {i}: " + " ".join(words[(i + k) % 10] for k in range(prompt_words + i % 3)),
             "response": f"The answer to {i} is " + " ".join(words[(2 * i + k) % 10] for k in range(2 + i % 4)) + "."}
            for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """``file``: tokenizer JSON; ``chat``: HF dir with CHATML; ``lenient``: HF dir with LENIENT; ``bare``: HF dir without template."""
    root = tmp_path_factory.mktemp("instruct_tok")
    backend = train_bpe(400, docstrings())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(root / "tokenizer.json"))
    out = {"file": root / "tokenizer.json", "root": root}
    for name, template in (("chat", CHATML), ("lenient", LENIENT), ("bare", None)):
        d = root / name
        d.mkdir()
        backend.save(str(d / "tokenizer.json"))
        config = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
        if template is not None:
            config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[name] = d
    return out


def recipe(paths, tokenizer, *, micro_batch_size: int = 2, seed: int = 7, **data) -> Recipe:
    spec = dict(kind="instruct", paths=[str(p) for p in paths], tokenizer=None if tokenizer is None else str(tokenizer), seq_length=SEQ,
                split="80,10,10")
    spec.update(data)
    return Recipe(data=DataSpec(**spec), seed=seed,
                  training=TrainingSpec(steps=10, micro_batch_size=micro_batch_size, global_batch_size=4,
                                        eval_batches=2))


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ---------------------------------------------------------------------------
# Masks and batch layout
# ---------------------------------------------------------------------------


def test_plain_template_labels_only_response_and_eos(toks, tmp_path):
    rows = pairs(40)
    S = 128  # every record fits
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    it = build_data(recipe([path], toks["file"], seq_length=S), dp_rank=0, dp_size=1)
    assert isinstance(it, InstructMicrobatchIterator)
    tok = load_tokenizer(toks["file"])
    train = rows[:32]  # data.split 80,10,10 over 40 records
    labelled = 0
    for batch in _take(it, 5):
        labelled += int(batch["loss_mask"].sum())
        assert batch["tokens"].shape == batch["labels"].shape == batch["prompt_tokens"].shape == (2, S)
        assert batch["loss_mask"].dtype == torch.float32
        assert torch.equal(batch["loss_mask"], (batch["labels"] != -100).float())
        assert torch.equal(batch["position_ids"], torch.arange(S).expand(2, S))
        for row in range(2):
            rec = train[int(batch["example_ids"][row])]
            prompt_text = f"### Instruction:\n{rec['prompt']}\n\n### Response:\n"
            prompt = tok.encode_ids(prompt_text)
            ids = tok.encode_ids(prompt_text + rec["response"]) + [tok.eos_id]
            assert ids[:len(prompt)] == prompt  # the boundary is a token boundary here
            n, p = len(ids), len(prompt)
            assert n <= S + 1
            assert batch["tokens"][row, :n].tolist() == ids[:S][:n]
            assert (batch["tokens"][row, n:] == tok.eos_id).all()  # right padding with the EOS id
            expected = [-100] * (p - 1) + ids[p:] + [-100] * (S - n + 1)
            assert batch["labels"][row].tolist() == expected  # prompt and padding -100, response + EOS labelled
            assert tok.decode(ids[p:-1]) == rec["response"]
            length = int(batch["prompt_lengths"][row])
            assert length == p and batch["prompt_tokens"][row, S - p:].tolist() == prompt
            assert (batch["prompt_tokens"][row, :S - p] == tok.eos_id).all()  # left padding
            assert batch["reference_texts"][row] == rec["response"]
    assert it.response_tokens == labelled  # the iterator counts the response tokens it yields
    assert it.stats["examples"] == it.stats["records"] == 32 and it.stats["response_tokens"] > 0


def test_chat_template_matches_transformers_and_labels_assistant_turns(toks, tmp_path):
    transformers = pytest.importorskip("transformers")  # the reference implementation (test extra)
    hf = transformers.AutoTokenizer.from_pretrained(str(toks["chat"]))
    template = load_chat_template(toks["chat"])
    single = CONVERSATION[1:3]
    for conv in (CONVERSATION, single, CONVERSATION[:2]):
        for gen in (False, True):
            assert template.render(conv, gen) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 8 + [{"messages": single}] * 2)
    r = recipe([path], toks["chat"], seq_length=128, split="100,0,0")
    source = instruct_source(r, "train")
    assert "chat_template" in source.description
    for k, conv in ((0, CONVERSATION), (8, single)):  # kept examples are in file order
        ref = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert source.ids[k].tolist() == ref["input_ids"]
        # response tokens are exactly transformers' assistant tokens (content + <|im_end|>), both turns
        assert source.response[k].astype(int).tolist() == ref["assistant_masks"]
        gen_prompt = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        assert source.prompts[k].tolist() == gen_prompt
        assert source.references[k] == conv[-1]["content"]
    batch = instruct_mod.collate_instruct(source, [0])
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    tok = load_tokenizer(toks["chat"])
    assert tok.eos_id == tok.token_to_id("<|im_end|>")
    text = tok.decode(labelled)
    assert "<|im_end|>" in text and "system" not in text and "json.dumps" not in text
    assert batch["reference_texts"] == [source.references[source.example_index(0)]]


def test_plain_template_for_messages_labels_every_assistant_turn(toks, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    tok = load_tokenizer(toks["file"])
    records = read_records([str(path)])
    text, spans = PlainTemplate().render_with_spans(records[0].messages)
    assert text.startswith("### System:\nAnswer in one short sentence.\n\n### Instruction:\nWhat does")
    assert [text[a:b] for a, b in spans] == ["A JSON formatted string.", "The Python object the document describes."]
    ex = tokenize_rendered(render_records(records, PlainTemplate()), tok)[0]
    runs = np.split(ex.ids[ex.response], np.nonzero(np.diff(np.nonzero(ex.response)[0]) > 1)[0] + 1)
    assert [tok.decode(r[:-1]) for r in runs] == ["A JSON formatted string.", "The Python object the document describes."]
    assert all(r[-1] == tok.eos_id for r in runs)  # EOS closes each response and is labelled
    assert tok.decode(ex.ids[:ex.generation_prompt_end]).endswith("And json.loads?\n\n### Response:\n")
    # auto with messages but no chat template: explicit plain required
    with pytest.raises(InputError, match=r"chat\.jsonl:1: the record uses messages.*data\.template: plain"):
        instruct_source(recipe([path], toks["file"], split="100,0,0"), "train")
    src = instruct_source(recipe([path], toks["file"], split="100,0,0", template="plain", seq_length=128), "train")
    assert src.stats["examples"] == 3


# ---------------------------------------------------------------------------
# Truncation and counters
# ---------------------------------------------------------------------------


def test_truncation_left_keeps_response_beginning_and_drop_counts(toks, tmp_path):
    rows = pairs(20)
    for i in (3, 7, 11):
        rows[i]["prompt"] = "Long context: " + " ".join(f"word{j}" for j in range(120))
    rows[5]["response"] = " ".join(f"answer{j}" for j in range(80))  # the response alone overflows
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    tok = load_tokenizer(toks["file"])
    examples = tokenize_rendered(render_records(read_records([str(path)]), PlainTemplate()), tok)
    window = SEQ + 1
    long = [i for i, e in enumerate(examples) if len(e.ids) > window]
    assert set(long) >= {3, 5, 7, 11}
    over = sum(e.prompt_end > SEQ for e in examples)
    assert over == 3
    handler_records = []
    handler = logging.Handler()
    handler.emit = handler_records.append
    logger = logging.getLogger("distill_plugins.data.instruct")
    logger.addHandler(handler)
    try:
        src = instruct_source(recipe([path], toks["file"], split="100,0,0"), "train")
    finally:
        logger.removeHandler(handler)
    assert src.stats["truncated"] == len(long) and src.stats["dropped"] == 0
    assert src.stats["prompt_over_length"] == over
    assert any("prompts are longer than data.seq_length" in r.getMessage() for r in handler_records)  # not silent
    for i, ex in enumerate(examples):
        kept, resp = src.ids[i], src.response[i]
        assert len(kept) <= window
        if i not in long:
            assert kept.tolist() == ex.ids.tolist()
            continue
        p, n = ex.prompt_end, len(ex.ids)
        keep_prompt = min(p, max(window - (n - p), window // 2))
        assert kept.tolist() == ex.ids[p - keep_prompt:p - keep_prompt + window].tolist()
        first = int(np.argmax(resp))
        assert first == keep_prompt >= 1  # the prompt lost its left part, the response starts intact
        assert kept[first:].tolist() == ex.ids[p:p + window - keep_prompt].tolist()
    assert len(src.ids[5]) == window and src.response[5][-1] and src.ids[5][-1] != tok.eos_id  # cut at its end
    assert src.stats["response_tokens"] == sum(int(r[1:].sum()) for r in src.response)

    dropped = instruct_source(recipe([path], toks["file"], split="100,0,0", truncation="drop"), "train")
    assert dropped.stats["dropped"] == len(long) and dropped.stats["truncated"] == 0
    assert dropped.num_samples == len(examples) - len(long)
    assert all(len(ids) <= window for ids in dropped.ids)
    only_long = write_jsonl(tmp_path / "only_long.jsonl", [rows[i] for i in (3, 7, 11)])
    with pytest.raises(InputError, match="all 3 examples are longer.*data.truncation=drop"):
        instruct_source(recipe([only_long], toks["file"], split="100,0,0", truncation="drop"), "train")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q"}', r"bad\.jsonl:2: the record has no 'response' key \(found \['prompt'\]\).*data\.response_key"),
    ('{"response": "a"}', r"bad\.jsonl:2: the record has no 'prompt' key.*data\.prompt_key"),
    ('{"prompt": "q", "response": "  "}', r"bad\.jsonl:2: the response \('response'\) is empty"),
    ('{"prompt": "q", "response": 3}', r"bad\.jsonl:2: 'response' must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"bad\.jsonl:2: the conversation has no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     r"bad\.jsonl:2: message 2 is an empty assistant response"),
    ('{"messages": [{"role": "user", "content": ["q"]}]}', r"bad\.jsonl:2: message 1 \(user\) has a list content"),
    ('{"messages": [], "prompt": "q"}', r"bad\.jsonl:2: the record has both"),
    ('{"prompt": "q", "response": "a"', r"bad\.jsonl:2: not valid JSON"),
    ('["q", "a"]', r"bad\.jsonl:2: a record must be a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "fine", "response": "ok"}', line])
    with pytest.raises(InputError, match=message):
        read_records([str(path)])


def test_non_utf8_and_non_jsonl_inputs(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "response": "fine"}\n\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DistillError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9 at byte 16 of the line"):
        read_records([str(path)])
    (tmp_path / "notes.txt").write_text("prompt and response\n")
    with pytest.raises(InputError, match="must be JSON lines"):
        read_records([str(tmp_path / "notes.txt")])
    with pytest.raises(InputError, match="matches no file"):
        read_records([str(tmp_path / "missing-*.jsonl")])


def test_template_errors(toks, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2)
    with pytest.raises(InputError, match=r"data\.template=chat but .*bare has no chat template"):
        instruct_source(recipe([chat], toks["bare"], split="100,0,0", template="chat"), "train")
    with pytest.raises(InputError, match=r"chat\.jsonl:1: the record uses messages, but .*bare has no chat template"):
        instruct_source(recipe([chat], toks["bare"], split="100,0,0"), "train")
    odd = [{"role": "user", "content": "q"}, {"role": "narrator", "content": "meanwhile"},
           {"role": "assistant", "content": "a"}]
    weird = write_jsonl(tmp_path / "roles.jsonl", [{"messages": CONVERSATION}, {"messages": odd}])
    with pytest.raises(InputError, match=r"roles\.jsonl:2: .*refused the conversation: unknown role narrator"):
        instruct_source(recipe([weird], toks["chat"], split="100,0,0", seq_length=128), "train")
    with pytest.raises(InputError, match=r"roles\.jsonl:2: message 2 \(role 'narrator'\) does not appear.*does not "
                                         r"know this role"):
        instruct_source(recipe([weird], toks["lenient"], split="100,0,0", seq_length=128), "train")
    with pytest.raises(InputError, match=r"roles\.jsonl:2: message 2 has role 'narrator', which the plain template "
                                         r"does not know"):
        instruct_source(recipe([weird], toks["file"], split="100,0,0", template="plain"), "train")
    with pytest.raises(InputError, match="needs data.tokenizer"):
        instruct_mod.instruct_tokenizer(recipe([chat], None))


# ---------------------------------------------------------------------------
# Data parallelism, resumption, evaluation
# ---------------------------------------------------------------------------


def test_dp_sharding_disjoint_complete_and_resume_exact(toks, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(30))
    r = recipe([path], toks["file"], split="100,0,0")
    single = build_data(r, dp_rank=0, dp_size=1)
    ranks = [build_data(r, dp_rank=k, dp_size=2) for k in range(2)]
    steps = 20  # 80 samples: past the 30-example epoch twice
    by_sample = {int(s): (b, row) for b in _take(single, 2 * steps) for row, s in enumerate(b["sample_ids"])}
    seen = []
    for _ in range(steps):
        for rank in ranks:
            batch = next(rank)
            for row, s in enumerate(batch["sample_ids"].tolist()):
                seen.append(s)
                ref, ref_row = by_sample[s]
                for key in ("tokens", "labels", "prompt_tokens", "example_ids"):
                    assert torch.equal(batch[key][row], ref[key][ref_row]), key
                assert batch["reference_texts"][row] == ref["reference_texts"][ref_row]
    assert sorted(seen) == list(range(4 * steps)) and len(set(seen)) == len(seen)  # disjoint and complete
    # one epoch visits every example once
    assert sorted(int(by_sample[s][0]["example_ids"][by_sample[s][1]]) for s in range(30)) == list(range(30))
    assert ranks[0].state_dict() == ranks[1].state_dict() == {
        "consumed_samples": 4 * steps, "kind": "instruct", "split": "train", "stream": "instruct"}

    uninterrupted = build_data(r, dp_rank=1, dp_size=2)
    head = _take(uninterrupted, 3)
    state = build_data(r, dp_rank=1, dp_size=2)
    _take(state, 3)
    saved = state.state_dict()
    resumed = build_data(r, dp_rank=1, dp_size=2, consumed_samples=saved["consumed_samples"])
    loaded = build_data(r, dp_rank=1, dp_size=2)
    loaded.load_state_dict(saved)
    for a, b, c in zip(_take(uninterrupted, 4), _take(resumed, 4), _take(loaded, 4)):
        _assert_same(a, b)
        _assert_same(a, c)
    assert head[0]["sample_ids"].tolist() == [2, 3]
    with pytest.raises(InputError, match="token-id batches"):
        loaded.load_state_dict({"consumed_samples": 4, "kind": "instruct", "split": "train", "stream": "tokens"})
    tokens = MicrobatchIterator(SyntheticSource(100, SEQ, 0), micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(InputError, match=r"prompt/response batches \(data\.kind: instruct\)"):
        tokens.load_state_dict(saved)


def test_eval_data_is_reiterable_and_covers_the_split(toks, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(50))
    r = recipe([path], toks["file"])
    held = build_eval_data(r, dp_rank=0, dp_size=1)
    assert isinstance(held, InstructEvalData) and len(held) == 2 and held.num_examples == 5
    first, second = list(held), list(held)
    assert len(first) == 2
    for a, b in zip(first, second):
        _assert_same(a, b)
    full = build_eval_data(r, dp_rank=0, dp_size=1, split="test", num_microbatches=3)
    rows = [(int(s), int(e)) for b in full for s, e in zip(b["sample_ids"], b["example_ids"])]
    assert sorted(e for s, e in rows if s < full.num_examples) == list(range(full.num_examples))


# ---------------------------------------------------------------------------
# The embedded instruction task
# ---------------------------------------------------------------------------

SUBSET = ["json/*", "shlex.py", "glob.py", "textwrap.py", "string.py", "calendar.py", "fractions.py",
          "statistics.py", "difflib.py", "queue.py"]


def test_embedded_task_split_by_package_without_leakage(tmp_path, toks, monkeypatch):
    task = build_embedded_instruct(tmp_path / "cache", include=SUBSET, progress=False)
    rows = {s: [json.loads(line) for line in open(task.jsonl[s], encoding="utf-8")] for s in task.jsonl}
    assert all(rows[s] for s in rows), {s: len(v) for s, v in rows.items()}  # this subset fills all three
    for key in ("package", "module"):
        owners = {}
        for split, items in rows.items():
            for row in items:
                owners.setdefault(row[key], set()).add(split)
        assert all(len(splits) == 1 for splits in owners.values()), key  # no package or module in two splits
    for split, items in rows.items():
        assert sorted({r["package"] for r in items}) == task.manifest["splits"][split]["packages"]
        assert task.manifest["splits"][split]["examples"] == len(items)
    ids = [r["id"] for s in rows for r in rows[s]]
    assert len(ids) == len(set(ids))
    # deterministic: a fresh build in another cache writes the same files
    again = build_embedded_instruct(tmp_path / "other", include=SUBSET, progress=False)
    assert again.manifest["splits"] == task.manifest["splits"]
    # the example format
    examples = {e["id"]: e for e in examples_of_file(stdlib_root(), "json/__init__.py")}
    dumps = examples["json/__init__.py:dumps"]
    assert dumps["prompt"].startswith("Summarize the function dumps(obj, *, skipkeys=False")
    assert dumps["prompt"].endswith(", ...) of module json.") and dumps["module"] == "json"
    assert dumps["response"] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert first_paragraph("  One\n  two.\n\n  Three.") == "One two."
    assert all(3 <= len(e["response"].split()) <= 60 for e in examples.values())
    # `paths: [embedded]` reads the task (here the subset) through the same data path
    monkeypatch.setattr(instruct_mod, "build_embedded_instruct",
                        functools.partial(build_embedded_instruct, tmp_path / "cache", include=SUBSET, progress=False))
    r = recipe(["embedded"], toks["file"], seq_length=96)
    train = build_data(r, dp_rank=0, dp_size=1)
    assert train.stats["records"] == len(rows["train"])
    batch = next(train)
    refs = {x["response"] for x in rows["train"]}
    assert all(text in refs for text in batch["reference_texts"])
    valid = build_eval_data(r, dp_rank=0, dp_size=1)
    assert valid.num_examples == len(rows["valid"])
    assert all(text in {x["response"] for x in rows["valid"]} for b in valid for text in b["reference_texts"])


# ---------------------------------------------------------------------------
# Cross-tokenizer aligners
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_tok(toks):
    """A second byte-level BPE (700 tokens, no chat tokens) for the teacher."""
    path = toks["root"] / "teacher.json"
    train_bpe(700, docstrings()).save(str(path))
    return path


def aligned_recipe(paths, student, teacher, **data) -> Recipe:
    r = recipe(paths, student, split="100,0,0", **data)
    return dataclasses.replace(r, data=dataclasses.replace(r.data, teacher_tokenizer=str(teacher)),
                               aligner=PartSpec(name="eta"))


def _check_pairs(batch) -> None:
    """Paired positions predict response tokens on both sides, covering the same characters."""
    mask = batch["aligned_mask"]
    rows, s_pos = mask.nonzero(as_tuple=True)
    t_pos = batch["align_teacher_pos"][rows, s_pos]
    assert (batch["student_labels"][rows, s_pos] != -100).all()
    assert (batch["teacher_labels"][rows, t_pos] != -100).all()
    assert torch.equal(batch["student_label_offsets"][rows, s_pos], batch["teacher_label_offsets"][rows, t_pos])
    assert int(batch["num_aligned"]) == int(mask.sum()) and int(batch["num_student_targets"]) == int(
        (batch["labels"] != -100).sum())


def test_aligned_instruct_batches_same_and_different_tokenizers(toks, teacher_tok, tmp_path):
    rows = pairs(30)
    rows[3]["prompt"] = "Long context: " + " ".join(f"word{j}" for j in range(120))  # truncated from the left
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    single = build_data(recipe([path], toks["file"], split="100,0,0"), dp_rank=0, dp_size=1)
    same = build_aligned_data(aligned_recipe([path], toks["file"], toks["file"]), dp_rank=0, dp_size=1)
    cross = build_aligned_data(aligned_recipe([path], toks["file"], teacher_tok), dp_rank=0, dp_size=1)
    assert isinstance(cross, InstructAlignedIterator)
    tok_t = load_tokenizer(teacher_tok)
    tok_s = load_tokenizer(toks["file"])
    aligned = targets = whole = 0
    saw_truncated = False
    for _ in range(16):  # past one epoch of 30 examples
        ref, a, c = next(single), next(same), next(cross)
        for batch in (a, c):  # the student side is the single-tokenizer path's
            for key in ("tokens", "labels", "loss_mask", "prompt_tokens", "example_ids"):
                assert torch.equal(batch[key], ref[key]), key
            assert torch.equal(batch["student_tokens"], batch["tokens"])
            _check_pairs(batch)
        # one tokenizer on both sides: every response target pairs with itself
        assert torch.equal(a["teacher_tokens"], a["tokens"]) and torch.equal(a["teacher_labels"], a["labels"])
        rows_, s_pos = a["aligned_mask"].nonzero(as_tuple=True)
        assert torch.equal(a["align_teacher_pos"][rows_, s_pos], s_pos) and int(a["num_aligned"]) == int(
            a["num_student_targets"])
        # the teacher labels the same response text (and its EOS) when its window holds it
        for row in range(2):
            s_lab, t_lab = c["labels"][row], c["teacher_labels"][row]
            s_text = tok_s.decode([i for i in s_lab.tolist() if i not in (-100, tok_s.eos_id)])
            t_text = tok_t.decode([i for i in t_lab.tolist() if i not in (-100, tok_t.eos_id)])
            if (t_lab == tok_t.eos_id).sum() == (s_lab == tok_s.eos_id).sum() == 1:
                assert s_text == t_text == c["reference_texts"][row]
                whole += 1
            saw_truncated |= int(c["example_ids"][row]) == 3
        aligned += int(c["num_aligned"])
        targets += int(c["num_student_targets"])
    assert saw_truncated and whole >= 16
    assert 0.5 < aligned / targets < 1.0, (aligned, targets)


def test_aligned_chat_template_and_resume(toks, teacher_tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}] * 6 + [{"messages": CONVERSATION}] * 2)
    r = aligned_recipe([path], toks["chat"], teacher_tok, seq_length=128)
    it = build_aligned_data(r, dp_rank=0, dp_size=1)
    batches = _take(it, 4)
    for batch in batches:
        _check_pairs(batch)
    # the student's <|im_start|>/<|im_end|> are one token each, the teacher spells them out; tokens after them
    # still pair because specials count as the text they are written as
    assert sum(int(b["num_aligned"]) for b in batches) > 0
    saved = it.state_dict()
    assert saved["stream"] == "instruct"
    resumed = build_aligned_data(r, dp_rank=0, dp_size=1, consumed_samples=saved["consumed_samples"])
    for x, y in zip(_take(it, 3), _take(resumed, 3)):  # prefetched batches equal freshly built ones
        _assert_same(x, y)
    held = build_aligned_eval_data(dataclasses.replace(r, data=dataclasses.replace(r.data, split="50,50,0")),
                                   dp_rank=0, dp_size=1, num_microbatches=2)
    assert held.num_examples == 4 and len(held) == 2
    for x, y in zip(held, held):
        _assert_same(x, y)
