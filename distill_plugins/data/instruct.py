"""Instruction data (``data.kind: instruct``): prompt/response records, response-only labels, padded batches.

Design
------
Records are JSON lines, either ``{"prompt": ..., "response": ...}`` (key names
from ``data.prompt_key`` / ``data.response_key``) or ``{"messages": [{"role":
..., "content": ...}, ...]}`` (``data.messages_key``). A prompt/response record
is the conversation ``[user: prompt, assistant: response]``. Each conversation
is rendered to one text with the character span of every assistant turn
(:mod:`distill_plugins.data.chat_template`: the tokenizer's chat template, or
the plain template), tokenized once with character offsets, and a token is a
**response token** when its first character lies inside a response span. With
the plain template the end-of-document id follows every response as a
response token. Every assistant turn of a multi-turn conversation is a
response.

A sequence ``x`` of ``n`` tokens gives ``tokens = x[:-1]`` and pre-shifted
``labels = x[1:]`` (methods.md section 0), with ``labels[i] = -100`` unless
``x[i+1]`` is a response token; padding is -100 too. So every objective,
selector and policy sees response positions only.

Length: a window holds ``s + 1`` tokens (``s = data.seq_length``). Let ``p``
be the tokens before the first response token and ``r = n - p`` the rest. When
``n > s + 1``:

* ``data.truncation: left`` keeps the prompt's last ``min(p, max(s + 1 - r,
  (s + 1) // 2))`` tokens and the rest's first ``s + 1 - kept_prompt``: the
  prompt is cut from the left and yields to the response down to half the
  window; a response longer than that keeps its beginning;
* ``data.truncation: drop`` drops the example.

Both are counted (``truncated``, ``dropped``), and ``prompt_over_length``
counts prompts that alone fill the window (``p > s``). Sequences are padded,
never packed: a packed row would let an example attend to the one before it.

Order and resumption are those of :mod:`distill_plugins.data.iterators`: with
``N`` kept examples, global sample ``i`` is example ``order[j]``, ``epoch, j =
divmod(i, N)``, ``order = default_rng([seed, SPLIT_CODES[split],
epoch]).permutation(N)``; DP rank ``r`` of microbatch ``k`` takes samples
``[c + r*b, c + (r+1)*b)``; the state is ``consumed_samples`` with ``stream:
"instruct"``, so a token-stream or text-stream checkpoint refuses this one.

Batch (``b`` rows, ``s = data.seq_length``)::

    tokens          int64 [b, s]  inputs, right-padded with the EOS id
    labels          int64 [b, s]  next token where it is a response token, else -100 (prompt, padding)
    loss_mask       f32   [b, s]  labels != -100
    position_ids    int64 [b, s]  0 .. s-1
    sample_ids      int64 [b]     global sample index of each row
    example_ids     int64 [b]     index of the row's example among the split's kept examples
    prompt_tokens   int64 [b, s]  generation prompt (everything before the last response), LEFT-padded
                                  with the EOS id, its last s tokens
    prompt_lengths  int64 [b]     real tokens in each prompt_tokens row (the last prompt_lengths[i])
    reference_texts list[str]     the last assistant message of each row (the reference answer, untruncated)

``reference_texts`` is the one key that is not a tensor; code moving a batch
to a device must skip it. A generation attention mask is ``arange(s) >= s -
prompt_lengths[:, None]``.

Batches are slices of arrays tokenized at start-up (every record of the split
is rendered and tokenized once when the source is built, which also finds
bad records before training), so building one costs microseconds and needs
no prefetch thread.

Usage::

    train = build_instruct_data(recipe, dp_rank=r, dp_size=dp, consumed_samples=c)
    batch = next(train)
    held_out = build_instruct_eval_data(recipe, dp_rank=r, dp_size=dp)   # re-iterable
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..logging import get_logger, global_rank
from .chat_template import ChatTemplate, PlainTemplate, TemplateError, load_chat_template
from .embedded_instruct import build_embedded_instruct
from .sources import JSON_LINES_SUFFIXES, SPLIT_CODES, expand_inputs, iter_json_lines, split_ranges
from .stream import ConsumedSamplesIterator, rank0_first
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["EMBEDDED", "Record", "Rendered", "Example", "read_records", "select_template", "render_records",
           "tokenize_rendered", "InstructSource", "InstructMicrobatchIterator", "InstructEvalData",
           "instruct_tokenizer", "instruct_records", "instruct_source", "build_instruct_data",
           "build_instruct_eval_data", "is_embedded_instruct", "collate_instruct", "kept_prompt_length"]

log = get_logger(__name__)

#: ``data.paths: [embedded]`` selects the built-in stdlib instruction task (:mod:`.embedded_instruct`).
EMBEDDED = "embedded"
#: Default tokenizer of the embedded task when ``data.tokenizer`` is null.
EMBEDDED_DEFAULT_TOKENIZER = "embedded:4096"


def is_embedded_instruct(data) -> bool:
    """True when a ``data`` section asks for the built-in instruction task (``kind: instruct, paths: [embedded]``)."""
    return data.kind == "instruct" and list(data.paths) == [EMBEDDED]


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One conversation of an input file: ``messages`` (role/content dicts) and where it came from (``file:line``)."""

    messages: tuple
    where: str
    uses_messages: bool = False


def _record(row: Any, where: str, prompt_key: str, response_key: str, messages_key: str) -> Record:
    if not isinstance(row, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if messages_key in row:
        if prompt_key in row or response_key in row:
            raise InputError(f"{where}: the record has both {messages_key!r} and {prompt_key!r}/{response_key!r}; "
                             "give one form per record")
        messages = row[messages_key]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: {messages_key!r} must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for k, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise InputError(f"{where}: message {k} must be an object with a string 'role' and a 'content'")
            if not isinstance(m["content"], str):
                raise InputError(f"{where}: message {k} ({m['role']}) has a {type(m['content']).__name__} content; "
                                 "only text contents (strings) are supported")
            if m["role"] == "assistant" and not m["content"].strip():
                raise InputError(f"{where}: message {k} is an empty assistant response; remove the record or "
                                 "give the response text")
            out.append(dict(m))
        if not any(m["role"] == "assistant" for m in out):
            raise InputError(f"{where}: the conversation has no assistant message, so there is no response to "
                             "learn; add one (role 'assistant')")
        return Record(tuple(out), where, uses_messages=True)
    missing = [k for k in (prompt_key, response_key) if k not in row]
    if missing:
        keys = sorted(row)
        hint = "data.response_key" if response_key in missing else "data.prompt_key"
        raise InputError(f"{where}: the record has no {missing[0]!r} key (found {keys}); records are "
                         f"{{{prompt_key!r}, {response_key!r}}} or {{{messages_key!r}: [...]}}; set {hint} "
                         "to the key holding it")
    prompt, response = row[prompt_key], row[response_key]
    for key, value in ((prompt_key, prompt), (response_key, response)):
        if not isinstance(value, str):
            raise InputError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not response.strip():
        raise InputError(f"{where}: the response ({response_key!r}) is empty; remove the record or give the "
                         "response text")
    return Record(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}), where)


def read_records(paths: Sequence[str], *, prompt_key: str = "prompt", response_key: str = "response",
                 messages_key: str = "messages") -> list[Record]:
    """Every record of the JSON-lines files named by ``paths`` (files or globs), in file order.

    Blank lines are skipped. Lines are decoded as UTF-8 one by one, so an
    error names the file and line.

    Raises:
        InputError: a file that is not JSON lines, bytes that are not UTF-8,
            invalid JSON, or a record breaking the format (module docstring).
    """
    records: list[Record] = []
    for path in expand_inputs(paths):
        if Path(path).suffix.lower() not in JSON_LINES_SUFFIXES:
            raise InputError(f"{path}: instruction data must be JSON lines ({', '.join(JSON_LINES_SUFFIXES)}), one "
                             "record per line")
        for lineno, row in iter_json_lines(path):
            records.append(_record(row, f"{path}:{lineno}", prompt_key, response_key, messages_key))
    return records


# ---------------------------------------------------------------------------
# Rendering and tokenization
# ---------------------------------------------------------------------------


def select_template(tokenizer_spec: Any, mode: str, records: Sequence[Record]):
    """The template for ``data.template`` = ``mode`` (``auto``, ``chat`` or ``plain``).

    ``chat`` needs the tokenizer's chat template; ``auto`` uses it when there
    is one, else the plain template, which ``messages`` records must then ask
    for explicitly (``plain``), since their roles are the template's business.

    Raises:
        InputError: the chat template is required (``chat``, or ``auto`` with
            ``messages`` records) but the tokenizer has none.
    """
    if mode == "plain":
        return PlainTemplate()
    if mode not in ("auto", "chat"):
        raise InputError(f"data.template={mode!r} is not one of auto, chat, plain")
    template = load_chat_template(tokenizer_spec)
    if template is not None:
        return template
    looked = (f"{tokenizer_spec} has no chat template (looked for chat_template.jinja and tokenizer_config.json's "
              "chat_template)" if Path(str(tokenizer_spec)).is_dir() else
              f"data.tokenizer={tokenizer_spec!r} is not a Hugging Face tokenizer directory, so it has no chat template")
    if mode == "chat":
        raise InputError(f"data.template=chat but {looked}; use a tokenizer directory with a chat template or set "
                         "data.template: plain")
    first = next((r for r in records if r.uses_messages), None)
    if first is not None:
        raise InputError(f"{first.where}: the record uses messages, but {looked} and data.template is auto; set "
                         "data.template: plain to render conversations with the plain template (docs/data.md)")
    return PlainTemplate()


@dataclass(frozen=True)
class Rendered:
    """A record rendered to text: response character spans, the reference answer, whether EOS follows responses."""

    text: str
    spans: tuple
    reference: str
    where: str
    eos_after_response: bool


def render_records(records: Sequence[Record], template) -> list[Rendered]:
    """Render every record with ``template`` (a :class:`ChatTemplate` or :class:`PlainTemplate`).

    Raises:
        InputError: naming ``file:line`` when the template refuses a record
            (unknown role, template exception, empty rendered response).
    """
    plain = isinstance(template, PlainTemplate)
    out = []
    for rec in records:
        try:
            text, spans = template.render_with_spans(rec.messages)
        except TemplateError as exc:
            raise InputError(f"{rec.where}: {exc}") from None
        reference = next(m["content"] for m in reversed(rec.messages) if m["role"] == "assistant")
        out.append(Rendered(text, tuple(spans), reference, rec.where, plain))
    return out


@dataclass(frozen=True)
class Example:
    """A tokenized conversation (before truncation).

    Attributes:
        ids: int64 ``[n]`` token ids.
        response: bool ``[n]``, True on response tokens (labelled when predicted).
        prompt_end: tokens before the first response token (``p``).
        generation_prompt_end: tokens before the last response (the generation prompt).
        reference: the last assistant message.
        where: ``file:line``.
        text, spans, eos_after_response: the rendering (:class:`Rendered`).
        offsets: int64 ``[n, 2]`` character span of each token in ``text``
            (an EOS added after a response spans ``(end, end)`` of it).
    """

    ids: np.ndarray
    response: np.ndarray
    prompt_end: int
    generation_prompt_end: int
    reference: str
    where: str
    text: str = ""
    spans: tuple = ()
    eos_after_response: bool = False
    offsets: Optional[np.ndarray] = None


def _encode_with_offsets(tok: Tokenizer, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    if tok.backend is not None:
        encs = tok.backend.encode_batch(list(texts), add_special_tokens=False)
        return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encs]
    out = []
    for text in texts:
        enc = tok.encode(text)
        out.append((np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)))
    return out


def response_token_spans(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token, the index of the response span holding its first character, else -1.

    Args:
        offsets: int ``[n, 2]`` character span of each token.
        spans: ``[(start, end), ...]`` character spans of the responses.
    """
    owner = np.full(len(offsets), -1, dtype=np.int64)
    starts = offsets[:, 0] if len(offsets) else np.zeros(0, dtype=np.int64)
    for k, (a, b) in enumerate(spans):
        owner[(starts >= a) & (starts < b)] = k
    return owner


def tokenize_rendered(rendered: Sequence[Rendered], tok: Tokenizer) -> list[Example]:
    """Tokenize rendered records once with offsets and mark their response tokens (module docstring).

    Raises:
        InputError: naming ``file:line``, when a response gets no token or
            nothing precedes the first response (no position predicts it).
    """
    examples = []
    for item, (ids, offsets) in zip(rendered, _encode_with_offsets(tok, [r.text for r in rendered])):
        owner = response_token_spans(offsets, item.spans)
        if item.eos_after_response:  # the plain template: EOS after each response, labelled like it
            ks = [k for k in range(len(item.spans)) if (owner == k).any()]
            cuts = [int(np.nonzero(owner == k)[0].max()) + 1 for k in ks]
            ids = np.insert(ids, cuts, tok.eos_id)
            owner = np.insert(owner, cuts, ks)
            ends = [item.spans[k][1] for k in ks]
            offsets = np.insert(offsets, cuts, np.stack([ends, ends], axis=1), axis=0)
        present = set(owner[owner >= 0].tolist())
        if len(present) != len(item.spans):
            raise InputError(f"{item.where}: a response renders to no token with tokenizer {tok.name}")
        response = owner >= 0
        first = int(np.argmax(response))
        if first == 0:
            raise InputError(f"{item.where}: the rendering starts with the response, so no position predicts its "
                             "first token; put a prompt (a user message) before it")
        last = int(np.nonzero(owner == owner.max())[0][0])
        examples.append(Example(ids.astype(np.int64), response, first, last, item.reference, item.where,
                                item.text, item.spans, item.eos_after_response, offsets))
    return examples


# ---------------------------------------------------------------------------
# Source: truncation, counters, sampling
# ---------------------------------------------------------------------------


def kept_prompt_length(prompt_length: int, length: int, window: int) -> int:
    """How many of a row's ``prompt_length`` prompt tokens a ``window``-token row keeps (cut from the left).

    A row of ``length`` tokens (prompt + response) that fits keeps its whole prompt. A longer one
    keeps the response's beginning: the prompt is cut from the left to what leaves room for the
    response, but never below half the window (a long response is then cut at its end):
    ``min(prompt_length, max(window - response_length, window // 2))``. The data's rows and the
    rows the engine rebuilds with generated responses (``engine.sequences``) follow this one rule.
    """
    if length <= window:
        return prompt_length
    return min(prompt_length, max(window - (length - prompt_length), window // 2))


class InstructSource:
    """The kept, truncated examples of one split and their sampling order (module docstring).

    Args:
        examples: tokenized examples of the split.
        seq_length: ``s``; a window holds ``s + 1`` tokens.
        seed, split: the shuffle's seed ``default_rng([seed, SPLIT_CODES[split], epoch])``.
        truncation: ``left`` or ``drop``.
        pad_id: id of padding (the EOS id).
        description: where the data came from, for messages.

    Attributes:
        stats: ``records`` (examples given), ``examples`` (kept), ``truncated``,
            ``dropped``, ``prompt_over_length`` (prompts longer than ``s``),
            ``response_tokens`` (labelled positions after truncation),
            ``prompt_tokens`` (other real tokens) and ``padding_tokens`` of one epoch.
    """

    def __init__(self, examples: Sequence[Example], *, seq_length: int, seed: int, split: str, truncation: str,
                 pad_id: int, description: str = "instruct data"):
        if truncation not in ("left", "drop"):
            raise InputError(f"data.truncation={truncation!r} is not one of left, drop")
        self.seq_length, self.seed, self.split = int(seq_length), int(seed), split
        self.split_code = SPLIT_CODES[split]
        self.pad_id, self.description = int(pad_id), description
        window = self.seq_length + 1
        kept_ids, kept_resp, prompts, refs, kept, starts = [], [], [], [], [], []
        stats = dict(records=len(examples), examples=0, truncated=0, dropped=0, prompt_over_length=0,
                     response_tokens=0, prompt_tokens=0, padding_tokens=0)
        for ex in examples:
            n, p = len(ex.ids), ex.prompt_end
            ids, resp, lo = ex.ids, ex.response, 0
            if p > self.seq_length:
                stats["prompt_over_length"] += 1
            if n > window:
                if truncation == "drop":
                    stats["dropped"] += 1
                    continue
                lo = p - kept_prompt_length(p, n, window)
                ids, resp = ids[lo:lo + window], resp[lo:lo + window]
                stats["truncated"] += 1
            gen = ex.ids[:ex.generation_prompt_end][-self.seq_length:]
            kept_ids.append(ids)
            kept_resp.append(resp)
            prompts.append(gen)
            refs.append(ex.reference)
            kept.append(ex)
            starts.append(lo)
            labelled = int(resp[1:].sum())
            stats["response_tokens"] += labelled
            stats["prompt_tokens"] += len(ids) - labelled
            stats["padding_tokens"] += window - len(ids)
        stats["examples"] = len(kept_ids)
        if not kept_ids:
            raise InputError(f"{description} ({split}): all {len(examples)} examples are longer than "
                             f"data.seq_length+1={window} tokens and data.truncation=drop drops them; raise "
                             "data.seq_length or set data.truncation: left")
        self.ids, self.response, self.prompts, self.references = kept_ids, kept_resp, prompts, refs
        self.examples, self.starts = kept, starts  # the untruncated examples; window k is examples[k].ids[starts[k]:]
        self.num_samples = len(kept_ids)
        self.stats = stats
        self._epoch, self._perm = -1, None

    def example_index(self, index: int) -> int:
        """The example of global sample ``index``: ``order[j]`` of its epoch."""
        epoch, j = divmod(int(index), self.num_samples)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.split_code, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return int(self._perm[j])

    def summary(self) -> str:
        """One line of counters for the log."""
        st = self.stats
        real = st["response_tokens"] + st["prompt_tokens"]
        frac = st["response_tokens"] / real if real else 0.0
        return (f"{self.description} ({self.split}): {st['examples']} examples of {st['records']} records, "
                f"{st['truncated']} truncated from the left, {st['dropped']} dropped, {st['prompt_over_length']} "
                f"prompts longer than seq_length={self.seq_length}; "
                f"{st['response_tokens']} response tokens = {100 * frac:.1f}% of {real} real tokens, "
                f"{st['padding_tokens']} padding")


def collate_instruct(source: InstructSource, sample_ids: Sequence[int]) -> dict[str, Any]:
    """The batch dict (module docstring) of global samples ``sample_ids`` of ``source``."""
    s, pad = source.seq_length, source.pad_id
    b = len(sample_ids)
    tokens = np.full((b, s), pad, dtype=np.int64)
    labels = np.full((b, s), -100, dtype=np.int64)
    prompt = np.full((b, s), pad, dtype=np.int64)
    prompt_len = np.zeros(b, dtype=np.int64)
    example_ids, refs = [], []
    for row, i in enumerate(sample_ids):
        k = source.example_index(i)
        ids, resp = source.ids[k], source.response[k]
        n = len(ids)
        tokens[row, :min(n, s)] = ids[:s]
        labels[row, :n - 1] = np.where(resp[1:], ids[1:], -100)
        g = source.prompts[k]
        prompt[row, s - len(g):] = g
        prompt_len[row] = len(g)
        example_ids.append(k)
        refs.append(source.references[k])
    labels_t = torch.from_numpy(labels)
    return {
        "tokens": torch.from_numpy(tokens), "labels": labels_t, "loss_mask": (labels_t != -100).float(),
        "position_ids": torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s).contiguous(),
        "sample_ids": torch.tensor(list(sample_ids), dtype=torch.int64),
        "example_ids": torch.tensor(example_ids, dtype=torch.int64),
        "prompt_tokens": torch.from_numpy(prompt), "prompt_lengths": torch.from_numpy(prompt_len),
        "reference_texts": refs,
    }


class InstructMicrobatchIterator(ConsumedSamplesIterator):
    """One DP rank's instruction microbatches; resumable by consumed samples (stream ``instruct``).

    Args:
        source: an :class:`InstructSource`.
        micro_batch_size, dp_rank, dp_size, consumed_samples, max_microbatches,
        kind, split: as for :class:`~distill_plugins.data.iterators.MicrobatchIterator`
        (:class:`~distill_plugins.data.stream.ConsumedSamplesIterator`).

    Attributes:
        response_tokens: labelled positions yielded so far by this iterator (this rank).
    """

    stream = "instruct"

    def __init__(self, source: InstructSource, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, max_microbatches: Optional[int] = None, kind: str = "instruct",
                 split: str = "train"):
        super().__init__(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, max_microbatches=max_microbatches, kind=kind, split=split,
                         seq_length=source.seq_length)
        self.source = source
        self.response_tokens = 0

    @property
    def stats(self) -> dict:
        """The split's counters (:attr:`InstructSource.stats`)."""
        return dict(self.source.stats)

    def __next__(self) -> dict[str, Any]:
        first = self._next_first()
        batch = collate_instruct(self.source, range(first, first + self.micro_batch_size))
        self.response_tokens += int(batch["loss_mask"].sum())
        self._advance()
        return batch


class InstructEvalData:
    """A re-iterable held-out set: each ``iter()`` yields the same ``num_microbatches`` microbatches from sample 0.

    ``num_examples`` is the split's size: the first ``num_examples`` samples
    visit every example once (one epoch), so a pass over all of them takes
    ``ceil(num_examples / (micro_batch_size * dp_size))`` microbatches and the
    rows with ``sample_ids >= num_examples`` repeat examples.
    """

    def __init__(self, source: InstructSource, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_microbatches: int, kind: str, split: str):
        self.source, self.num_microbatches = source, num_microbatches
        self.num_examples = source.num_samples
        self._kw = dict(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, kind=kind, split=split)

    @property
    def stats(self) -> dict:
        return dict(self.source.stats)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return InstructMicrobatchIterator(self.source, consumed_samples=0, max_microbatches=self.num_microbatches,
                                          **self._kw)

    def __len__(self) -> int:
        return self.num_microbatches


# ---------------------------------------------------------------------------
# Recipe -> iterators
# ---------------------------------------------------------------------------


def instruct_tokenizer(recipe, which: str = "student") -> Tokenizer:
    """The tokenizer of ``recipe.data`` for ``which`` model (``embedded:4096`` for the embedded task by default).

    Raises:
        InputError: no ``data.tokenizer`` for file data.
    """
    data = recipe.data
    spec = data.teacher_tokenizer if which == "teacher" and data.teacher_tokenizer else data.tokenizer
    if spec is None:
        if not is_embedded_instruct(data):
            raise InputError("data.kind=instruct needs data.tokenizer (a tokenizers JSON file, a Hugging Face "
                             "tokenizer directory, whose chat_template is then used, or embedded:N)")
        spec = EMBEDDED_DEFAULT_TOKENIZER
    return load_tokenizer(spec)


def instruct_records(recipe, split: str) -> tuple[list[Record], str]:
    """The records of one split of ``recipe.data`` and a description of where they came from.

    Files: all records in file order, split into contiguous ranges by
    ``data.split`` (as ``data.kind: jsonl`` does). ``paths: [embedded]``: the
    built-in task's own split by package (collective: global rank 0 builds the
    cache first).

    Raises:
        InputError: no ``data.paths``, or an empty split.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split={split!r} is not one of train, valid, test")
    data = recipe.data
    keys = dict(prompt_key=data.prompt_key, response_key=data.response_key, messages_key=data.messages_key)
    if is_embedded_instruct(data):
        built = rank0_first(build_embedded_instruct)
        records = read_records([str(built.jsonl[split])], **keys)
        where = f"the embedded instruction task at {built.directory}"
    else:
        if not data.paths:
            raise InputError("data.kind=instruct needs data.paths (JSON-lines files or globs, or [embedded] for the "
                             "built-in task)")
        every = read_records(list(data.paths), **keys)
        lo, hi = split_ranges(len(every), data.split)[split]
        records = every[lo:hi]
        where = f"data.split={data.split!r} over {len(every)} records in {', '.join(map(str, data.paths))}"
    if not records:
        raise InputError(f"the {split} split of the instruction data is empty ({where}); give that split a larger "
                         "share or more records")
    return records, where


def instruct_source(recipe, split: str = "train", *, tokenizer: Optional[Tokenizer] = None) -> InstructSource:
    """Read, render, tokenize and truncate one split of ``recipe.data`` (``kind: instruct``); logs its counters.

    Collective for the embedded task or ``embedded:N`` tokenizers when
    torch.distributed is initialised (caches are built by rank 0 first).
    """
    data = recipe.data
    records, where = instruct_records(recipe, split)
    if tokenizer is None:
        cached = is_embedded_instruct(data) or str(data.tokenizer).startswith("embedded:")
        tokenizer = rank0_first(lambda: instruct_tokenizer(recipe)) if cached else instruct_tokenizer(recipe)
    spec = data.tokenizer if data.tokenizer is not None else tokenizer.name
    template = select_template(spec, data.template, records)
    examples = tokenize_rendered(render_records(records, template), tokenizer)
    source = InstructSource(examples, seq_length=data.seq_length, seed=recipe.seed, split=split,
                            truncation=data.truncation, pad_id=tokenizer.eos_id,
                            description=f"instruct data ({where}; {template.name})")
    if global_rank() == 0:
        log.info("%s", source.summary())
        st = source.stats
        if st["prompt_over_length"] or st["dropped"]:
            log.warning("instruct %s: %d prompts are longer than data.seq_length=%d; %d examples dropped, %d "
                        "truncated from the left (data.truncation=%s)", split, st["prompt_over_length"],
                        data.seq_length, st["dropped"], st["truncated"], data.truncation)
    return source


def build_instruct_data(recipe, *, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                        split: str = "train") -> InstructMicrobatchIterator:
    """This DP rank's endless instruction microbatches (``build_data`` for ``data.kind: instruct``)."""
    source = instruct_source(recipe, split)
    return InstructMicrobatchIterator(source, micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank,
                                      dp_size=dp_size, consumed_samples=consumed_samples, kind=recipe.data.kind,
                                      split=split)


def build_instruct_eval_data(recipe, *, dp_rank: int, dp_size: int, split: str = "valid",
                             num_microbatches: Optional[int] = None) -> InstructEvalData:
    """The held-out instruction microbatches of this DP rank (``training.eval_batches`` by default)."""
    source = instruct_source(recipe, split)
    n = num_microbatches if num_microbatches is not None else recipe.training.eval_batches
    if n < 0:
        raise ValueError(f"num_microbatches={n} must be >= 0")
    return InstructEvalData(source, micro_batch_size=recipe.training.micro_batch_size, dp_rank=dp_rank,
                            dp_size=dp_size, num_microbatches=n, kind=recipe.data.kind, split=split)
