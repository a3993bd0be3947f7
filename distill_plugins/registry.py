"""Named registries of parts, one per kind, with errors that help.

A :class:`Registry` maps a name to a part class and remembers which plugin (and
which distribution) registered it. Registering a name twice is an error that
names both owners; asking for an unknown name lists the registered names and
the closest match. :meth:`Registry.build` checks recipe parameters against the
part's ``Config`` dataclass before constructing it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

from .config import did_you_mean, parse_dataclass
from .errors import PluginError, RecipeError, UnknownPartError
from .interfaces import PART_KINDS, Part, PartConfig


@dataclass(frozen=True)
class Entry:
    """One registered part and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str

    @property
    def owner(self) -> str:
        dist = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"plugin {self.plugin!r}{dist}"


def config_problem(config: type) -> Optional[str]:
    """Why a part's ``Config`` class cannot hold recipe parameters, or None when it can.

    The class must itself be a dataclass (``@dataclass(frozen=True, kw_only=True)``
    on the class, not only on :class:`PartConfig`: an undecorated subclass's
    annotations are not fields, so its parameters would be silently unknown),
    its annotations must resolve, and every default must have its field's type
    (``lr: float = "fast"`` would only fail in the first recipe that omits it).
    When no field is required, the defaults must also pass ``__post_init__``,
    since a part built without parameters uses them.
    """
    if "__dataclass_fields__" not in vars(config):
        return (f"Config {config.__qualname__} is not a dataclass; decorate it with "
                "@dataclass(frozen=True, kw_only=True)")
    try:
        typing.get_type_hints(config)
    except Exception as exc:  # NameError, TypeError: an annotation that names nothing importable
        return f"Config {config.__qualname__} has an annotation that cannot be resolved: {type(exc).__name__}: {exc}"
    defaults, required = {}, []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            required.append(f.name)
    _, errors = parse_dataclass(config, defaults, f"Config {config.__qualname__} default")
    errors = [e for e in errors if "missing required key" not in e]
    if errors:
        return ("invalid default value(s): " + "; ".join(errors)
                + "; each default must have its field's type and pass the Config's own checks")
    return None


class Registry:
    """Parts of one kind (``objective``, ``token_selector``, ...), by name."""

    def __init__(self, kind: str):
        if kind not in PART_KINDS:
            raise ValueError(f"unknown part kind {kind!r}; kinds: {sorted(PART_KINDS)}")
        self.kind = kind
        self.base = PART_KINDS[kind]
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, cls: type, *, plugin: str, distribution: str = "", version: str = "") -> None:
        """Register ``cls`` under ``name``.

        Raises:
            PluginError: on a bad name, a class of the wrong kind, a ``Config`` that
                is not a dataclass or whose defaults do not fit their types
                (:func:`config_problem`), or a duplicate name (naming both owners).
        """
        entry = Entry(self.kind, name, cls, plugin, distribution, version)
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"{entry.owner} registered {self.kind} name {name!r}: names must be identifiers")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"{entry.owner} registered {self.kind} {name!r} as {cls!r}, which does not subclass "
                              f"distill_plugins.{self.base.__name__}")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, PartConfig)):
            raise PluginError(f"{entry.owner}: {self.kind} {name!r} has Config={config!r}; it must subclass "
                              "distill_plugins.PartConfig")
        problem = config_problem(config)
        if problem:
            raise PluginError(f"{entry.owner}: {self.kind} {name!r}: {problem}")
        if name in self._entries:
            first = self._entries[name]
            raise PluginError(f"{self.kind} {name!r} is registered twice: by {first.owner} and by {entry.owner}; "
                              "rename one of them or disable a plugin")
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        """The entry for ``name``; :class:`UnknownPartError` lists the known names."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownPartError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                                   f"registered: {known}") from None

    def check_params(self, name: str, params: dict[str, Any], where: str) -> tuple[Optional[PartConfig], list[str]]:
        """Validate ``params`` against the part's Config. Returns ``(config, errors)``."""
        if name not in self._entries:
            try:
                self.get(name)
            except UnknownPartError as exc:
                return None, [f"{where}: {exc}" if where else str(exc)]
        entry = self._entries[name]
        label = f"{self.kind} {name!r}" if where in ("", self.kind) else f"{where} ({self.kind} {name!r})"
        return parse_dataclass(entry.cls.Config, params, label)

    def build(self, name: str, params: Optional[dict[str, Any]] = None, where: Optional[str] = None) -> Part:
        """Construct the part ``name`` with checked ``params``.

        Raises:
            UnknownPartError: unknown name.
            RecipeError: bad parameters (all of them listed).
        """
        entry = self.get(name)
        config, errors = self.check_params(name, dict(params or {}), where or "")
        if errors:
            raise RecipeError(errors, subject=f"{self.kind} {name!r}")
        part = entry.cls(config)
        part.name = name
        return part
