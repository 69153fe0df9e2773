"""The server-drawn SVG charts (node/web/charts.py) and the page environment (node/web/render.py): pure functions."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree

import pytest

from llorch.node.web.amounts import decimals_of_step, money_to
from llorch.node.web.charts import (BARS_MAX, HEIGHT_PX, PLOT_PX, TOP_PX, X_LABELS_MAX, Axis, Bar, bar_chart, buckets,
                                    value_axis, x_label_indices)
from llorch.node.web.render import age, environment, money

SVG = "{http://www.w3.org/2000/svg}"


def parsed(markup) -> ElementTree.Element:
    """The chart's markup as XML: a <div> holding the value axis's SVG and the plot's."""
    return ElementTree.fromstring(str(markup))


def texts(chart: ElementTree.Element, kind: str) -> list[str]:
    return [text.text or "" for text in chart.iter(f"{SVG}text") if text.get("class") == kind]


def test_each_bar_carries_its_exact_value_and_heights_scale_to_the_axis():
    chart = parsed(bar_chart("tokens", [Bar("00h", 10), Bar("01h", 0), Bar("02h", 40)], " tokens"))
    bars = list(chart.iter(f"{SVG}rect"))
    assert [int(b.get("data-value")) for b in bars] == [10, 0, 40]
    heights = [int(b.get("height")) for b in bars]
    assert heights[2] > heights[0] > heights[1] == 1          # zero is a hairline, the axis's top fills the plot
    assert texts(chart, "y-tick") == ["0", "10", "20", "30", "40"]
    assert heights[2] == PLOT_PX and heights[0] == round(PLOT_PX / 4)
    assert bars[2].find(f"{SVG}title").text == "02h: 40 tokens"


def test_labels_and_titles_are_escaped():
    svg = str(bar_chart("<script>alert(1)</script>", [Bar('"><script>alert(2)</script>', 1)]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    parsed(svg)                                               # still well-formed XML


def test_empty_and_all_zero_series_draw_without_dividing_by_zero():
    assert "no data" in str(bar_chart("empty", []))
    zeros = parsed(bar_chart("z", [Bar("a", 0), Bar("b", 0)]))
    assert [int(b.get("height")) for b in zeros.iter(f"{SVG}rect")] == [1, 1]
    assert texts(zeros, "y-tick") == ["0", "1"]
    assert texts(parsed(bar_chart("z", [Bar("a", 0)], currency="EUR")), "y-tick") == \
        ["0.00 EUR", "0.50 EUR", "1.00 EUR"]                 # an empty month still reads as money


def test_a_negative_value_is_drawn_below_the_zero_line_with_its_sign():
    """A day of refunds (corrections) nets negative: it is a bar down from the axis, never a zero."""
    chart = parsed(bar_chart("spend", [Bar("d1", 30), Bar("d2", -10), Bar("d3", 0)], currency="EUR"))
    bars = list(chart.iter(f"{SVG}rect"))
    assert [int(b.get("data-value")) for b in bars] == [30, -10, 0]
    axis = next(line for line in chart.iter(f"{SVG}line") if line.get("class") == "axis")
    zero_y = float(axis.get("y1"))
    up, down, flat = bars
    assert float(up.get("y")) + int(up.get("height")) == zero_y                 # rises from the zero line
    assert float(down.get("y")) == zero_y and "negative" in down.get("class")     # hangs below it
    assert abs(int(up.get("height")) - 3 * int(down.get("height"))) <= 2        # one scale for both (to a pixel)
    assert TOP_PX < zero_y < TOP_PX + PLOT_PX
    assert int(up.get("height")) + int(down.get("height")) == PLOT_PX
    assert down.find(f"{SVG}title").text == "d2: -0.000010 EUR"                 # exact, in the currency
    assert texts(chart, "y-tick") == ["-0.00001 EUR", "0.00000 EUR", "0.00001 EUR", "0.00002 EUR", "0.00003 EUR"]
    only_refunds = list(parsed(bar_chart("spend", [Bar("d1", -5), Bar("d2", 0)])).iter(f"{SVG}rect"))
    assert int(only_refunds[0].get("height")) == round(5 * PLOT_PX / 6)        # on an axis from -6 to 0


def test_the_value_axis_takes_a_few_round_steps_that_cover_the_series():
    assert value_axis(0, 1_234) == Axis(0, 1_500, 500)
    assert value_axis(-2_000, 310_000) == Axis(-100_000, 400_000, 100_000)
    assert value_axis(0, 2) == Axis(0, 2, 1) and value_axis(-5, 0) == Axis(-6, 0, 2)
    assert value_axis(0, 0, 1_000_000) == Axis(0, 1_000_000, 500_000)
    for bottom, top in ((0, 7), (-3, 999), (0, 123_456_789), (-10**15, 10**18)):
        axis = value_axis(bottom, top)
        assert axis.low <= bottom and axis.high >= top and 0 in axis.ticks, (bottom, top, axis)
        assert 2 <= len(axis.ticks) - 1 <= 6, (bottom, top, axis)        # a few steps, never a crowd
    with pytest.raises(ValueError):
        value_axis(1, 5)                                      # zero is always on the axis


def test_money_on_the_value_axis_is_in_the_currency_with_the_decimals_its_step_needs():
    """Never micro-units on a page: 1234 micro-EUR a day reads 0.0015 EUR at the axis's top, exact in tooltips."""
    chart = bar_chart("spend", [Bar("01 Mar", 1_234)], currency="EUR")
    assert texts(parsed(chart), "y-tick") == ["0.0000 EUR", "0.0005 EUR", "0.0010 EUR", "0.0015 EUR"]
    assert "01 Mar: 0.001234 EUR" in str(chart) and "micro" not in str(chart)
    big = parsed(bar_chart("revenue", [Bar("01 Mar", 2_345_678_000)], currency="EUR"))
    assert texts(big, "y-tick")[-1] == "3,000.00 EUR"
    counts = parsed(bar_chart("tokens", [Bar("00:00", 123_456)], " tokens"))
    assert texts(counts, "y-tick") == ["0", "50,000", "100,000", "150,000"]
    assert [decimals_of_step(step) for step in (1, 20, 500, 10_000, 500_000, 10**9)] == [6, 5, 4, 2, 2, 2]
    assert money_to(1_500_000, 2, "EUR") == "1.50 EUR" and money_to(-500, 4, "EUR") == "-0.0005 EUR"


def test_the_x_axis_labels_every_few_bars_and_always_the_last():
    assert x_label_indices(14) == [1, 4, 7, 10, 13] and x_label_indices(24) == [3, 8, 13, 18, 23]
    assert x_label_indices(3) == [0, 1, 2] and x_label_indices(1) == [0]
    assert all(len(x_label_indices(n)) <= X_LABELS_MAX and x_label_indices(n)[-1] == n - 1 for n in range(1, 401))
    days = [Bar(f"{day:02d} Mar", day) for day in range(1, 15)]
    chart = parsed(bar_chart("spend", days, currency="EUR"))
    assert texts(chart, "x-tick") == ["02 Mar", "05 Mar", "08 Mar", "11 Mar", "14 Mar"]
    last = [text for text in chart.iter(f"{SVG}text") if text.get("class") == "x-tick"][-1]
    assert (last.get("x"), last.get("text-anchor")) == ("100.000%", "end")        # inside the plot, not past it


def test_no_chart_text_is_scaled_with_the_width():
    """Neither SVG of a chart has a viewBox: text renders at its style's size however wide the page
    (tests/test_browser_harness.py measures it in Chromium)."""
    chart = parsed(bar_chart("spend", [Bar("01 Mar", 5), Bar("02 Mar", -3)], currency="EUR"))
    svgs = list(chart.iter(f"{SVG}svg"))
    assert len(svgs) == 2 and all(svg.get("viewBox") is None for svg in svgs)
    assert all(svg.get("height") == str(HEIGHT_PX) for svg in svgs)


@pytest.mark.parametrize("bad", [[Bar("a", 1.5)], [Bar("a", True)], [Bar("a", 1)] * (BARS_MAX + 1)])
def test_refuses_fractional_or_too_many_bars(bad):
    with pytest.raises(ValueError):
        bar_chart("bad", bad)


def test_buckets_fill_gaps_with_zero_in_order():
    bars = buckets({0: 5, 2000: 7}, 0, 4, 1000, lambda start: f"t{start}")
    assert bars == [Bar("t0", 5), Bar("t1000", 0), Bar("t2000", 7), Bar("t3000", 0)]
    with pytest.raises(ValueError):
        buckets({}, 0, 0, 1000, str)


def test_money_is_exact_and_ages_read_naturally():
    assert money(1_234_567) == "1.234567 EUR" and money(0) == "0.000000 EUR" and money(None) == "unlimited"
    assert money(10**18 + 1) == "1000000000000.000001 EUR"   # no float rounding
    assert [age(None), age(5_000), age(600_000), age(-3_000)] == ["never", "5 s ago", "10 min ago", "3 s in the future"]


def test_the_environment_escapes_every_value_by_default():
    page = environment().from_string("<p>{{ name }}</p>").render(name="<script>alert(1)</script>")
    assert page == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert re.search(r"<title>x</title>", environment().get_template("base.html").render(refresh_s=0)
                     .replace("llorch", "x"))
