"""Bar charts as SVG, drawn on the server: a pure function of the series, so a page needs no script and fetches
nothing. Every label goes through markupsafe's escaping; the numbers are integers (money in minor units)."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

BARS_MAX = 400                 # a chart of more bars than this is a bug in the caller, not a wider chart
WIDTH_PX = 640
HEIGHT_PX = 180
AXIS_PX = 22                   # room under the bars for the first and last label
TOP_PX = 16                    # room above the tallest bar for its value


@dataclass(frozen=True)
class Bar:
    label: str                 # shown under the first and last bar and in each bar's tooltip
    value: int


def bar_chart(title: str, bars: list[Bar], unit: str = "") -> Markup:
    """An SVG bar chart of ``bars`` (left to right), scaled to the largest value; zero bars are drawn as a hairline.
    Each bar carries ``data-value`` (the exact integer) and a ``<title>`` tooltip, so people and tests read the same
    number the page was given."""
    if len(bars) > BARS_MAX:
        raise ValueError(f"a chart has at most {BARS_MAX} bars, got {len(bars)}")
    if any(not isinstance(bar.value, int) or bar.value < 0 for bar in bars):
        raise ValueError("chart values are non-negative integers")
    plot_px = HEIGHT_PX - AXIS_PX - TOP_PX
    top = max((bar.value for bar in bars), default=0)
    slot = WIDTH_PX / max(1, len(bars))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH_PX} {HEIGHT_PX}"'
             f' width="{WIDTH_PX}" height="{HEIGHT_PX}" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="0" y1="{TOP_PX + plot_px}" x2="{WIDTH_PX}" y2="{TOP_PX + plot_px}" class="axis"/>']
    for index, bar in enumerate(bars):
        height = 1 if top == 0 or bar.value == 0 else max(1, round(bar.value * plot_px / top))
        x = index * slot + slot * 0.1
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{TOP_PX + plot_px - height}" width="{slot * 0.8:.1f}" '
                     f'height="{height}" data-label="{escape(bar.label)}" data-value="{bar.value}">'
                     f"<title>{escape(bar.label)}: {bar.value}{escape(unit)}</title></rect>")
    if bars:
        parts.append(f'<text x="0" y="{HEIGHT_PX - 6}" class="tick">{escape(bars[0].label)}</text>')
        parts.append(f'<text x="{WIDTH_PX}" y="{HEIGHT_PX - 6}" class="tick" text-anchor="end">'
                     f"{escape(bars[-1].label)}</text>")
        parts.append(f'<text x="{WIDTH_PX}" y="11" class="tick" text-anchor="end">max {top}{escape(unit)}</text>')
    else:
        parts.append(f'<text x="{WIDTH_PX / 2}" y="{HEIGHT_PX / 2}" class="tick" text-anchor="middle">no data</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def buckets(values: dict[int, int], first: int, count: int, step: int, label) -> list[Bar]:
    """``count`` consecutive buckets of width ``step`` from ``first`` (e.g. hours or days in ms), zero where
    ``values`` (bucket start → value) has none; ``label(start)`` names each."""
    if not 0 < count <= BARS_MAX:
        raise ValueError(f"a chart has 1..{BARS_MAX} buckets, got {count}")
    return [Bar(label(first + i * step), values.get(first + i * step, 0)) for i in range(count)]
