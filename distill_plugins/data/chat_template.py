"""Rendering conversations to text: a tokenizer's chat template (jinja2) or the plain template.

Design
------
A conversation is a list of messages ``{"role": ..., "content": ...}``. It is
rendered to **one text** plus the character spans of the assistant turns (the
responses). The instruct data path (:mod:`distill_plugins.data.instruct`)
tokenizes that text once, with character offsets, and labels exactly the
tokens that start inside a response span, so the loss covers responses only
whatever the template looks like.

Two templates:

* :class:`ChatTemplate`: the ``chat_template`` of a Hugging Face tokenizer
  directory (``chat_template.jinja``, else ``tokenizer_config.json``'s
  ``chat_template``; a list of named templates uses ``default``), rendered with
  jinja2 under the semantics of transformers' ``apply_chat_template``: a
  sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the
  ``loopcontrols`` extension and a pass-through ``{% generation %}`` tag;
  ``raise_exception``, ``strftime_now`` and a JSON ``tojson`` filter
  (``ensure_ascii=False``); variables ``messages``, ``tools=None``,
  ``documents=None``, ``add_generation_prompt`` and the named special tokens
  (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``,
  ``cls_token``, ``mask_token``) as strings. Tests compare the result with
  transformers' ``apply_chat_template``.

  Response spans come from rendering prefixes: for the assistant message
  ``i``, ``P = render(messages[:i], add_generation_prompt=True)`` and ``F =
  render(messages[:i+1])``; the response is ``F[len(P):]`` (the content and
  whatever the template closes the turn with, e.g. ``<|im_end|>``), which
  requires ``F`` to start with ``P`` and the whole rendering to start with
  ``F``; trailing whitespace after the turn (a newline after ``<|im_end|>``)
  is not part of it. (For a ChatML template whose ``{% generation %}`` block
  holds the content and ``<|im_end|>``, the tokens labelled this way are
  exactly transformers' ``return_assistant_tokens_mask``; tested.) A template breaking the
  prefix property (one that rewrites earlier turns) is rejected with a clear
  error. A message whose stripped content does not appear in the text it adds
  has a role the template does not know (templates often skip such roles
  silently), which is also an error.

* :class:`PlainTemplate` (``data.template: plain``, or ``auto`` when the
  tokenizer has no chat template and the records are prompt/response pairs)::

      ### System:\\n{content}              (system messages)
      ### Instruction:\\n{content}         (user messages)
      ### Response:\\n{content}<eos>       (assistant messages; the response is {content} and the EOS id)

  messages joined by a blank line (``"\\n\\n"``), responses without trailing
  whitespace. The EOS is not text: the data path appends the tokenizer's
  end-of-document id after each response's tokens, labelled like the
  response, so a model learns to stop.

Usage::

    template = load_chat_template("models/qwen")          # None when the directory has none
    text, spans = template.render_with_spans(messages)     # spans: [(start, end), ...] per assistant turn
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InputError

__all__ = ["ChatTemplate", "PlainTemplate", "TemplateError", "load_chat_template", "SPECIAL_TOKEN_NAMES"]

#: Special tokens a chat template sees as variables (transformers' named special tokens).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(InputError):
    """A conversation cannot be rendered (unknown role, template exception, inconsistent prefixes).

    The instruct reader adds the file and line to the message.
    """


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %} ... {% endgeneration %}`` renders its body (transformers marks assistant text with it).

    Response spans here come from prefix renderings, so the tag needs no tracking.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in transformers)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _message_text(messages: Sequence[dict]) -> list[dict]:
    """Fresh copies of the messages, so a template can never change the caller's records."""
    return [dict(m) for m in messages]


class _SpanRenderer:
    """Shared prefix logic: the response spans of a conversation from ``render(messages, add_generation_prompt)``."""

    name = "template"

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def render_with_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and the ``[start, end)`` character span of every assistant turn in it.

        Raises:
            TemplateError: an unknown role, an empty response, a template
                exception, or prefixes that are not prefixes of the whole.
        """
        raise NotImplementedError


class ChatTemplate(_SpanRenderer):
    """A jinja2 chat template with transformers' rendering semantics (module docstring).

    Args:
        source: the template text.
        special_tokens: ``bos_token``... -> token string, passed to the template.
        name: where the template came from, for messages.
    """

    def __init__(self, source: str, *, special_tokens: Optional[dict[str, str]] = None, name: str = "chat template"):
        if not isinstance(source, str) or not source.strip():
            raise InputError(f"{name}: the chat template is empty")
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise InputError(f"{name}: the chat template does not parse (line {exc.lineno}: {exc.message})") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._empty: Optional[str] = None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (``add_generation_prompt``: followed by the opening of an assistant turn)."""
        try:
            return self._template.render(messages=_message_text(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"the chat template of {self.name} refused the conversation: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"the chat template of {self.name} failed on the conversation: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _render_empty(self) -> str:
        if self._empty is None:
            try:
                self._empty = self.render([])
            except TemplateError:  # templates may index messages[0]; nothing rendered before the first message
                self._empty = ""
        return self._empty

    def render_with_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        whole = self.render(messages)
        spans: list[tuple[int, int]] = []
        previous = self._render_empty()
        for i, message in enumerate(messages):
            upto = whole if i == len(messages) - 1 else self.render(messages[:i + 1])
            if not whole.startswith(upto):
                raise TemplateError(f"the chat template of {self.name} renders messages 1..{i + 1} differently "
                                    "inside the whole conversation (it rewrites earlier turns), so response spans "
                                    "are ambiguous; use single-turn records or data.template: plain")
            content = str(message.get("content", "")).strip()
            if upto == previous or (content and content not in upto[len(previous):]):
                raise TemplateError(f"message {i + 1} (role {message.get('role')!r}) does not appear in the rendering: "
                                    f"the chat template of {self.name} does not know this role")
            if message.get("role") == "assistant":
                before = self.render(messages[:i], add_generation_prompt=True) if i else self._render_empty()
                if not upto.startswith(before):
                    raise TemplateError(f"the chat template of {self.name}: the rendering up to assistant message "
                                        f"{i + 1} does not start with the generation prompt before it, so the "
                                        "response span is ambiguous; use data.template: plain")
                if len(upto) == len(before) or not upto[len(before):].strip():
                    raise TemplateError(f"assistant message {i + 1} renders to no text with the chat template of "
                                        f"{self.name}")
                spans.append((len(before), len(upto.rstrip())))  # a turn's trailing newline is not the answer
            previous = upto
        return whole, spans


class PlainTemplate(_SpanRenderer):
    """The documented fallback template (module docstring); knows the roles system, user and assistant."""

    name = "plain template"
    HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    SEPARATOR = "\n\n"

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.render_with_spans(messages, add_generation_prompt=add_generation_prompt)[0]

    def render_with_spans(self, messages: Sequence[dict],
                          add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        size = 0
        for i, message in enumerate(messages):
            role = message.get("role")
            header = self.HEADERS.get(role)
            if header is None:
                raise TemplateError(f"message {i + 1} has role {role!r}, which the plain template does not know "
                                    f"(it knows {', '.join(self.HEADERS)})")
            piece = (self.SEPARATOR if i else "") + header
            parts.append(piece)
            size += len(piece)
            content = message["content"]
            if role == "assistant":
                content = content.rstrip()
                spans.append((size, size + len(content)))
            parts.append(content)
            size += len(content)
        if add_generation_prompt:
            parts.append((self.SEPARATOR if messages else "") + self.HEADERS["assistant"])
        return "".join(parts), spans


def _token_string(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def load_chat_template(spec: Any) -> Optional[ChatTemplate]:
    """The chat template of a Hugging Face tokenizer directory, or None when ``spec`` has none.

    ``spec`` is a ``data.tokenizer`` value. Only a directory can carry a
    template: ``chat_template.jinja`` (transformers' current format) takes
    priority over ``tokenizer_config.json``'s ``chat_template`` (a string, or a
    list of ``{"name", "template"}`` of which ``default`` is used), as in
    transformers. Special-token strings come from ``tokenizer_config.json``,
    then ``special_tokens_map.json``.

    Raises:
        InputError: a template list without ``default``, or an unreadable file.
    """
    if spec is None or str(spec).startswith("embedded:"):
        return None
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        return None
    config_path = path / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    jinja_file = path / "chat_template.jinja"
    where = str(jinja_file)
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        source = config.get("chat_template")
        where = f"{config_path} (chat_template)"
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if "default" not in named:
                raise InputError(f"{config_path}: chat_template lists templates {sorted(map(str, named))} but none "
                                 "is named 'default'; write the one to use to chat_template.jinja")
            source = named["default"]
    if not source:
        return None
    specials: dict[str, str] = {}
    map_path = path / "special_tokens_map.json"
    fallback = _read_json(map_path) if map_path.is_file() else {}
    for key in SPECIAL_TOKEN_NAMES:
        value = _token_string(config.get(key)) or _token_string(fallback.get(key))
        if value is not None:
            specials[key] = value
    return ChatTemplate(source, special_tokens=specials, name=where)
