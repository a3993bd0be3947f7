"""Built-in temperature policies, registered like any plugin's (see docs/temperature.md)."""

from __future__ import annotations

from distill_plugins.hookspecs import hookimpl
from distill_plugins.selection.temperature import IDTS, ConstantTemperature, ScheduledTemperature


@hookimpl
def distill_register_temperature_policies(register):
    register("constant", ConstantTemperature)
    register("schedule", ScheduledTemperature)
    register("idts", IDTS)
