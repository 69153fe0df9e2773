"""The server-drawn SVG charts (node/web/charts.py) and the page environment (node/web/render.py): pure functions."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree

import pytest

from llorch.node.web.charts import AXIS_PX, BARS_MAX, HEIGHT_PX, TOP_PX, Bar, bar_chart, buckets
from llorch.node.web.render import age, environment, money

SVG = "{http://www.w3.org/2000/svg}"


def parsed(markup) -> ElementTree.Element:
    return ElementTree.fromstring(str(markup))


def test_each_bar_carries_its_exact_value_and_heights_scale_to_the_largest():
    svg = parsed(bar_chart("tokens", [Bar("00h", 10), Bar("01h", 0), Bar("02h", 40)], " tokens"))
    bars = svg.findall(f"{SVG}rect")
    assert [int(b.get("data-value")) for b in bars] == [10, 0, 40]
    heights = [int(b.get("height")) for b in bars]
    assert heights[2] > heights[0] > heights[1] == 1          # zero is a hairline, the largest fills the plot
    assert heights[2] == HEIGHT_PX - AXIS_PX - TOP_PX and heights[0] == round(heights[2] / 4)
    assert bars[2].find(f"{SVG}title").text == "02h: 40 tokens"


def test_labels_and_titles_are_escaped():
    svg = str(bar_chart("<script>alert(1)</script>", [Bar('"><script>alert(2)</script>', 1)]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    parsed(svg)                                               # still well-formed XML


def test_empty_and_all_zero_series_draw_without_dividing_by_zero():
    assert "no data" in str(bar_chart("empty", []))
    assert [int(b.get("height")) for b in parsed(bar_chart("z", [Bar("a", 0), Bar("b", 0)])).findall(f"{SVG}rect")] \
        == [1, 1]


def test_a_negative_value_is_drawn_below_the_zero_line_with_its_sign():
    """A day of refunds (corrections) nets negative: it is a bar down from the axis, never a zero."""
    svg = parsed(bar_chart("spend", [Bar("d1", 30), Bar("d2", -10), Bar("d3", 0)], " micro-EUR"))
    bars = svg.findall(f"{SVG}rect")
    assert [int(b.get("data-value")) for b in bars] == [30, -10, 0]
    axis = svg.find(f"{SVG}line")
    zero_y = float(axis.get("y1"))
    up, down, flat = bars
    assert float(up.get("y")) + int(up.get("height")) == zero_y                 # rises from the zero line
    assert float(down.get("y")) == zero_y and "negative" in down.get("class")     # hangs below it
    assert abs(int(up.get("height")) - 3 * int(down.get("height"))) <= 2        # one scale for both (to a pixel)
    assert TOP_PX < zero_y < HEIGHT_PX - AXIS_PX
    assert int(up.get("height")) + int(down.get("height")) == HEIGHT_PX - AXIS_PX - TOP_PX
    assert down.find(f"{SVG}title").text == "d2: -10 micro-EUR"
    assert "min -10 micro-EUR" in str(bar_chart("spend", [Bar("d1", 30), Bar("d2", -10)], " micro-EUR"))
    only_refunds = parsed(bar_chart("spend", [Bar("d1", -5), Bar("d2", 0)])).findall(f"{SVG}rect")
    assert int(only_refunds[0].get("height")) == HEIGHT_PX - AXIS_PX - TOP_PX


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
