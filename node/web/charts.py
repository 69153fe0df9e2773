"""Bar charts as SVG, drawn on the server: a pure function of the series, so a page needs no script and fetches
nothing. Every label goes through markupsafe's escaping; the numbers are signed integers (money in minor units; a
day of refunds is negative)."""

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
    """An SVG bar chart of ``bars`` (left to right) on one scale from the smallest value to the largest, zero
    included: positive bars rise from the zero line, negative ones (a day of refunds) hang below it, zero bars are a
    hairline on it. Each bar carries ``data-value`` (the exact signed integer) and a ``<title>`` tooltip, so people
    and tests read the same number the page was given."""
    if len(bars) > BARS_MAX:
        raise ValueError(f"a chart has at most {BARS_MAX} bars, got {len(bars)}")
    if any(type(bar.value) is not int for bar in bars):
        raise ValueError("chart values are integers")
    plot_px = HEIGHT_PX - AXIS_PX - TOP_PX
    top = max(0, max((bar.value for bar in bars), default=0))
    bottom = min(0, min((bar.value for bar in bars), default=0))
    span = top - bottom
    zero_y = TOP_PX + (plot_px if span == 0 else round(top * plot_px / span))
    slot = WIDTH_PX / max(1, len(bars))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH_PX} {HEIGHT_PX}"'
             f' width="{WIDTH_PX}" height="{HEIGHT_PX}" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="0" y1="{zero_y}" x2="{WIDTH_PX}" y2="{zero_y}" class="axis"/>']
    above_px, below_px = zero_y - TOP_PX, TOP_PX + plot_px - zero_y     # the largest bar each way fills its side
    for index, bar in enumerate(bars):
        if bar.value == 0:
            height = 1
        elif bar.value > 0:
            height = max(1, round(bar.value * above_px / top))
        else:
            height = max(1, round(bar.value * below_px / bottom))
        x = index * slot + slot * 0.1
        y, kind = (zero_y - height, "bar") if bar.value >= 0 else (zero_y, "bar negative")
        parts.append(f'<rect class="{kind}" x="{x:.1f}" y="{y}" width="{slot * 0.8:.1f}" '
                     f'height="{height}" data-label="{escape(bar.label)}" data-value="{bar.value}">'
                     f"<title>{escape(bar.label)}: {bar.value}{escape(unit)}</title></rect>")
    if bars:
        parts.append(f'<text x="0" y="{HEIGHT_PX - 6}" class="tick">{escape(bars[0].label)}</text>')
        parts.append(f'<text x="{WIDTH_PX}" y="{HEIGHT_PX - 6}" class="tick" text-anchor="end">'
                     f"{escape(bars[-1].label)}</text>")
        parts.append(f'<text x="{WIDTH_PX}" y="11" class="tick" text-anchor="end">max {top}{escape(unit)}'
                     f'{f", min {bottom}{escape(unit)}" if bottom < 0 else ""}</text>')
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
