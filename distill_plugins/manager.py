"""Builds the plugin manager and the typed facade the rest of the code uses.

Load order (``build_plugin_host``), each step's parts visible to the next:

1. the hook specs of :mod:`distill_plugins.hookspecs`;
2. the built-in plugins, :data:`DEFAULT_PLUGINS`, in that order;
3. plugins advertised by installed distributions under the entry-point group
   ``distill_plugins`` (skipped when ``DISTILL_PLUGINS_NO_ENTRY_POINTS=1``;
   single plugins are skipped by naming them in ``DISTILL_PLUGINS_DISABLE``,
   comma-separated);
4. plugin modules named in the recipe's ``plugins:`` list (importable names);
5. ``check_pending()``: an implementation of a hook nobody specified is an
   error, which catches typos such as ``distill_register_objective``.

Then every ``distill_register_*`` implementation is called, in load order, with
a ``register`` callback that records the calling plugin as the owner. Nothing
happens at import time and there is no module-global manager: each call builds
a fresh host.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata as metadata
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Mapping, Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .interfaces import Part
from .registry import Entry, Registry

#: Built-in parts, registered through the same hooks as any third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "distill_plugins.builtin.objectives",
    "distill_plugins.builtin.selectors",
    "distill_plugins.builtin.temperature",
    "distill_plugins.builtin.aligners",
    "distill_plugins.builtin.sequences",
)

ENTRY_POINT_GROUP = "distill_plugins"
NO_ENTRY_POINTS_ENV = "DISTILL_PLUGINS_NO_ENTRY_POINTS"
DISABLE_ENV = "DISTILL_PLUGINS_DISABLE"

#: registration hook name -> registry kind
REGISTRATION_HOOKS: dict[str, str] = {
    "distill_register_objectives": "objective",
    "distill_register_token_selectors": "token_selector",
    "distill_register_temperature_policies": "temperature_policy",
    "distill_register_vocab_aligners": "vocab_aligner",
    "distill_register_sequence_sources": "sequence_source",
}


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, where it came from, and its distribution."""

    name: str
    source: str  # "builtin", "entry_point" or "recipe"
    distribution: str
    version: str

    def describe(self) -> str:
        dist = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"{self.name}{dist}"


class PluginHost:
    """Typed facade over the pluggy manager and the registries (one per kind of part).

    The rest of the package calls these methods and never ``pm.hook`` by string.
    """

    def __init__(self, pm: pluggy.PluginManager, plugins: list[PluginInfo]):
        self.pm = pm
        self.plugins = plugins
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in REGISTRATION_HOOKS.values()}

    # -- parts --------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        try:
            return self.registries[kind]
        except KeyError:
            raise PluginError(f"unknown part kind {kind!r}; kinds: {sorted(self.registries)}") from None

    def names(self, kind: str) -> list[str]:
        return self.registry(kind).names()

    def part_class(self, kind: str, name: str) -> type:
        return self.registry(kind).get(name).cls

    def build(self, kind: str, name: str, params: Optional[Mapping[str, Any]] = None) -> Part:
        """Build part ``name`` of ``kind`` from checked ``params``."""
        return self.registry(kind).build(name, dict(params or {}))

    def entries(self) -> list[Entry]:
        """Every registered part of every kind, sorted by kind then name."""
        return [e for kind in sorted(self.registries) for e in self.registries[kind].entries()]

    # -- hooks ----------------------------------------------------------------
    def validate_recipe(self, recipe: Mapping[str, Any]) -> list[str]:
        """Errors from every plugin's ``distill_validate_recipe``, concatenated, in load order.

        Each implementation gets its own deep copy of ``recipe`` (one plugin's
        mutation never reaches another). A plugin that raises, or returns
        something other than a list of strings, does not stop validation: that
        becomes an error string naming the plugin and its distribution, so
        ``distill check`` reports it with the others and exits 2.
        """
        by_name = {info.name: info for info in self.plugins}
        errors: list[str] = []
        for impl in self.pm.hook.distill_validate_recipe.get_hookimpls():  # registration (= load) order
            info = by_name.get(impl.plugin_name)
            dist = f" ({info.distribution} {info.version})" if info and info.distribution else ""
            who = f"plugin {impl.plugin_name!r}{dist}"
            kwargs = {"recipe": copy.deepcopy(recipe)}
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:  # a bug in a plugin is reported as that plugin's, not as a traceback
                errors.append(f"{who} raised {type(exc).__name__} in distill_validate_recipe: {exc}")
                continue
            if result is None:
                continue
            if isinstance(result, str):
                result = [result]
            if not isinstance(result, (list, tuple)):
                errors.append(f"{who}: distill_validate_recipe returned {type(result).__name__}; it must return a "
                              "list of error strings (empty when all is well)")
                continue
            errors.extend(str(e) for e in result)
        return errors

    def on_step_end(self, step: int, metrics: Mapping[str, float]) -> None:
        self.pm.hook.distill_on_step_end(step=step, metrics=metrics)

    def plugin_lines(self) -> list[str]:
        """``name (distribution version)`` for each loaded plugin, load order."""
        return [p.describe() for p in self.plugins]


def _distribution_of_module(module_name: str) -> tuple[str, str]:
    top = module_name.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top, [])
    except Exception:  # broken metadata of an unrelated package must not stop us
        dists = []
    if not dists:
        return "", ""
    name = dists[0]
    try:
        return name, metadata.version(name)
    except metadata.PackageNotFoundError:
        return name, ""


def _import_plugin(module_name: str, label: str, distribution: str, version: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        dist = f" ({distribution} {version})" if distribution else ""
        raise PluginError(f"plugin {label!r}{dist} failed to import: {type(exc).__name__}: {exc}") from exc


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def build_plugin_host(extra_plugins: Iterable[str] = (), *, entry_points: Optional[bool] = None,
                      builtins: Iterable[str] = DEFAULT_PLUGINS) -> PluginHost:
    """Build a plugin manager and register every part. See the module docstring for the order.

    Args:
        extra_plugins: importable module names (a recipe's ``plugins:`` list).
        entry_points: load the ``distill_plugins`` entry-point group; default is
            on unless ``DISTILL_PLUGINS_NO_ENTRY_POINTS=1``.
        builtins: the built-in plugin modules (tests may narrow this).

    Raises:
        PluginError: a plugin failed to import, implements an unknown hook, or
            registered a part badly (duplicate name, wrong base class).
    """
    if entry_points is None:
        entry_points = os.environ.get(NO_ENTRY_POINTS_ENV, "") not in ("1", "true", "yes")
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    disabled = _disabled()
    own_version = _own_version()

    def add(obj: Any, name: str, info: PluginInfo) -> None:
        if name in disabled:
            return
        if pm.has_plugin(name) or pm.is_registered(obj):
            return  # the same module named twice (e.g. in a recipe and an entry point)
        try:
            pm.register(obj, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {info.describe()!r} could not be registered: {exc}") from exc
        infos.append(info)

    for module_name in builtins:
        add(_import_plugin(module_name, module_name, "distill-plugins", own_version), module_name,
            PluginInfo(module_name, "builtin", "distill-plugins", own_version))

    if entry_points:
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist is not None else ""
            version = ep.dist.version if ep.dist is not None else ""
            if ep.name in disabled:
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                where = f" ({dist} {version})" if dist else ""
                raise PluginError(f"plugin {ep.name!r}{where} failed to import: {type(exc).__name__}: {exc}") from exc
            add(obj, ep.name, PluginInfo(ep.name, "entry_point", dist, version))

    for module_name in extra_plugins:
        dist, version = _distribution_of_module(module_name)
        add(_import_plugin(module_name, module_name, dist, version), module_name,
            PluginInfo(module_name, "recipe", dist, version))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements a hook that is not specified: {exc}; "
                          "hooks are listed in docs/plugin_hooks.md") from exc

    host = PluginHost(pm, infos)
    by_name = {info.name: info for info in infos}
    for hook_name, kind in REGISTRATION_HOOKS.items():
        registry = host.registry(kind)
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order: built-ins first
            info = by_name.get(impl.plugin_name, PluginInfo(impl.plugin_name, "unknown", "", ""))

            def register(name: str, cls: type, _info: PluginInfo = info, _registry: Registry = registry) -> None:
                _registry.add(name, cls, plugin=_info.name, distribution=_info.distribution, version=_info.version)

            kwargs = {"register": register}
            impl.function(*[kwargs[arg] for arg in impl.argnames])
    return host


def _own_version() -> str:
    try:
        return metadata.version("distill-plugins")
    except metadata.PackageNotFoundError:
        return "0+unknown"
