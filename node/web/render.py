"""The Jinja2 environment every page is rendered with: autoescaping on for every template (a provider's, tenant's
or peer's string is text, never markup), templates read from the package, and the few filters pages share."""

from __future__ import annotations

import time
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from llorch.node.web.amounts import money
from llorch.node.web.charts import bar_chart

TEMPLATES = Path(__file__).parent / "templates"


def environment(*template_dirs: Path) -> Environment:
    """Templates from ``template_dirs`` first, then the shared layout (``base.html``)."""
    env = Environment(loader=ChoiceLoader([FileSystemLoader([*map(str, template_dirs), str(TEMPLATES)])]),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["money"] = money
    env.filters["age"] = age
    env.filters["utc"] = utc
    env.filters["utc_day"] = lambda ms: "-" if ms is None else time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))
    env.filters["ppm_percent"] = lambda ppm: f"{ppm / 10_000:.1f}%"
    env.globals["bar_chart"] = bar_chart
    return env


def age(ms: int | None) -> str:
    if ms is None:
        return "never"
    seconds = ms // 1000
    if seconds < 0:
        return f"{-seconds} s in the future"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def utc(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms // 1000))
