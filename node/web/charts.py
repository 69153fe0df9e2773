"""Bar charts drawn on the server as SVG: a pure function of the series, so a page needs no script and fetches
nothing. Every label goes through markupsafe's escaping; the numbers are signed integers (money in minor units; a
day of refunds is negative).

A chart is two SVGs side by side (base.html's ``.chart`` rules lay them out): the value axis, as wide as its longest
label, and the plot, as wide as the page allows. Neither has a viewBox: the plot places its bars and its x labels in
percentages of its width and everything else in CSS pixels, so text renders at the size the style gives it at any
width. (A chart scaled by a viewBox shrinks its text with its width: 11 px labels rendered at 6 px on a phone.)
The value axis shows a few round values, money in the currency ("0.0015 EUR"); the x axis labels every few bars,
the last bar always, never more than fit a phone's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from markupsafe import Markup, escape

from llorch.node.web.amounts import MINOR_PER_MAJOR, decimals_of_step, money, money_to

BARS_MAX = 400                 # a chart of more bars than this is a bug in the caller, not a wider chart
HEIGHT_PX = 180
TOP_PX = 10                    # room above the top grid line for the upper half of its label
AXIS_PX = 24                   # room under the plot for the x axis's labels
PLOT_PX = HEIGHT_PX - TOP_PX - AXIS_PX
VALUE_INTERVALS = 4            # the value axis aims at this many steps (rounding them makes 2 to 6)
X_LABELS_MAX = 5               # five labels like "14 Mar" fit the narrowest plot (about 270 px at a 420 px window)
LABEL_CHAR_PX = 7.5            # generous: one character of an 11 px label (DejaVu Sans' digits are 7 px)
LABEL_GAP_PX = 6               # between a value label and the plot
EDGE_PERCENT = 8.0             # an x label whose bar is this near an edge is aligned to that edge, so it stays inside
STEP_DIGITS_MAX = 40           # a round step has at most this many digits (values are at most 64-bit, in practice)


@dataclass(frozen=True)
class Bar:
    label: str                 # under the bar when the x axis labels it, and in the bar's tooltip
    value: int


@dataclass(frozen=True)
class Axis:
    """The value axis: a tick every ``step`` from ``low`` ≤ 0 to ``high`` ≥ 0 (``low`` < ``high``), zero among
    them."""

    low: int
    high: int
    step: int

    @property
    def ticks(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def y_px(self, value: int) -> float:
        """Where ``value`` sits, in pixels from the top of the chart."""
        return TOP_PX + (self.high - value) * PLOT_PX / (self.high - self.low)


def round_step(at_least: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is ≥ ``at_least`` (≥ 1)."""
    magnitude = 1
    for _ in range(STEP_DIGITS_MAX):
        for multiple in (1, 2, 5):
            if multiple * magnitude >= at_least:
                return multiple * magnitude
        magnitude *= 10
    raise ValueError(f"no round step for {at_least}: values are too large to chart")


def value_axis(bottom: int, top: int, empty_span: int = 1) -> Axis:
    """The axis of a series from ``bottom`` (≤ 0) to ``top`` (≥ 0): about VALUE_INTERVALS round steps that cover
    both. ``empty_span``: the span shown when every value is zero (one unit: one EUR, one request)."""
    if not bottom <= 0 <= top:
        raise ValueError(f"an axis includes zero: {bottom}..{top}")
    if bottom == top:
        top = empty_span
    step = round_step(-(-(top - bottom) // VALUE_INTERVALS))
    return Axis((bottom // step) * step, -(-top // step) * step, step)


def x_label_indices(count: int) -> list[int]:
    """The bars the x axis labels, left to right: every few, counted back from the last (today, this hour)."""
    every = -(-count // X_LABELS_MAX)
    return list(range(count - 1, -1, -every))[::-1]


def bar_chart(title: str, bars: list[Bar], unit: str = "", currency: str | None = None) -> Markup:
    """An SVG bar chart of ``bars`` (left to right) on one scale, zero included: positive bars rise from the zero
    line, negative ones (a day of refunds) hang below it, zero bars are a hairline on it. ``currency``: the values
    are minor units of it, shown in the currency; else they are counts of ``unit`` (" tokens"). Each bar carries
    ``data-label``, ``data-value`` (the exact signed integer) and a ``<title>`` tooltip with the exact amount, so
    people and tests read the same number the page was given."""
    if len(bars) > BARS_MAX:
        raise ValueError(f"a chart has at most {BARS_MAX} bars, got {len(bars)}")
    if any(type(bar.value) is not int for bar in bars):
        raise ValueError("chart values are integers")
    axis = value_axis(min(0, min((bar.value for bar in bars), default=0)),
                      max(0, max((bar.value for bar in bars), default=0)),
                      MINOR_PER_MAJOR if currency else 1)
    exact: Callable[[int], str]
    if currency:
        decimals = decimals_of_step(axis.step)
        tick, exact = (lambda value: money_to(value, decimals, currency)), (lambda value: money(value, currency))
    else:
        tick, exact = (lambda value: f"{value:,}"), (lambda value: f"{value:,}{unit}")
    return Markup(f'<div class="chart" role="img" aria-label="{escape(title)}">'
                  f"{value_labels(axis, tick)}{plot(title, bars, axis, exact)}</div>")


def value_labels(axis: Axis, tick: Callable[[int], str]) -> str:
    """The value axis: one label per tick, right-aligned against the plot, level with its grid line."""
    labels = [(value, tick(value)) for value in axis.ticks]
    width = round(max(len(text) for _, text in labels) * LABEL_CHAR_PX) + LABEL_GAP_PX
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart-values" width="{width}" height="{HEIGHT_PX}" '
             f'aria-hidden="true">']
    parts += [f'<text class="y-tick" x="{width - LABEL_GAP_PX}" y="{axis.y_px(value) + 4:.1f}" text-anchor="end">'
              f"{escape(text)}</text>" for value, text in labels]
    return "".join(parts) + "</svg>"


def plot(title: str, bars: list[Bar], axis: Axis, exact: Callable[[int], str]) -> str:
    """The bars over the grid, and the x axis's labels under them; x in percent of the width, y in pixels."""
    zero_y = round(axis.y_px(0))
    px_per_unit = PLOT_PX / (axis.high - axis.low)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart-plot" width="100%" height="{HEIGHT_PX}">',
             f"<title>{escape(title)}</title>"]
    parts += [f'<line class="grid" x1="0" y1="{round(axis.y_px(value))}" x2="100%" y2="{round(axis.y_px(value))}"/>'
              for value in axis.ticks if value != 0]
    parts.append(f'<line class="axis" x1="0" y1="{zero_y}" x2="100%" y2="{zero_y}"/>')
    slot = 100 / max(1, len(bars))
    for index, bar in enumerate(bars):
        height = max(1, round(abs(bar.value) * px_per_unit))
        y, kind = (zero_y - height, "bar") if bar.value >= 0 else (zero_y, "bar negative")
        parts.append(f'<rect class="{kind}" x="{index * slot + slot * 0.1:.3f}%" y="{y}" width="{slot * 0.8:.3f}%" '
                     f'height="{height}" data-label="{escape(bar.label)}" data-value="{bar.value}">'
                     f"<title>{escape(bar.label)}: {escape(exact(bar.value))}</title></rect>")
    bottom = TOP_PX + PLOT_PX
    for index in x_label_indices(len(bars)) if bars else []:
        centre = (index + 0.5) * slot
        x, anchor = (index * slot, "start") if centre < EDGE_PERCENT else \
            ((index + 1) * slot, "end") if centre > 100 - EDGE_PERCENT else (centre, "middle")
        parts.append(f'<line class="tick-mark" x1="{centre:.3f}%" y1="{bottom}" x2="{centre:.3f}%" '
                     f'y2="{bottom + 4}"/>')
        parts.append(f'<text class="x-tick" x="{x:.3f}%" y="{HEIGHT_PX - 6}" text-anchor="{anchor}">'
                     f"{escape(bars[index].label)}</text>")
    if not bars:
        parts.append(f'<text class="no-data" x="50%" y="{HEIGHT_PX // 2}" text-anchor="middle">no data</text>')
    return "".join(parts) + "</svg>"


def buckets(values: dict[int, int], first: int, count: int, step: int, label) -> list[Bar]:
    """``count`` consecutive buckets of width ``step`` from ``first`` (e.g. hours or days in ms), zero where
    ``values`` (bucket start → value) has none; ``label(start)`` names each."""
    if not 0 < count <= BARS_MAX:
        raise ValueError(f"a chart has 1..{BARS_MAX} buckets, got {count}")
    return [Bar(label(first + i * step), values.get(first + i * step, 0)) for i in range(count)]
