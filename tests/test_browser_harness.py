"""The browser harness itself: headless Chromium renders a server-drawn chart page (no network, no script) and the
page's numbers read back from the DOM are the ones it was given. Skips, saying why, without Chromium."""

from __future__ import annotations

from llorch.node.web.charts import Bar, bar_chart
from llorch.node.web.render import environment
from tests.browser import (WIDTHS, bar_values, browser, downloads, layout_problems,  # noqa: F401 (fixtures)
                           reset_viewport, screenshots, set_viewport)

PAGE = """{% extends "base.html" %}{% block heading %}harness{% endblock %}
{% block main %}<section id="tokens">{{ chart }}</section><p id="who">{{ who }}</p>{% endblock %}"""


def test_chromium_renders_a_chart_page_and_its_numbers_read_back(browser, screenshots, tmp_path):
    series = [Bar(f"{hour:02d}h", value) for hour, value in enumerate([3, 0, 12, 7, 1])]
    page = tmp_path / "chart.html"
    page.write_text(environment().from_string(PAGE).render(chart=bar_chart("tokens per hour", series),
                                                           who="<script>document.title='owned'</script>"))
    browser.get(page.as_uri())
    assert bar_values(browser, "tokens") == [3, 0, 12, 7, 1]
    assert browser.title == "llorch"                      # the escaped script did not run
    assert browser.find_element("id", "who").text == "<script>document.title='owned'</script>"
    assert screenshots(browser, "harness-chart").stat().st_size > 1000


def test_a_charts_labels_stay_readable_from_a_phones_width_to_a_desktops(browser, screenshots, tmp_path):
    """Fourteen days of money and a day of a refund: at 420 px and 1400 px no label of the chart renders under
    10 px (an SVG scaled down by its viewBox shrinks its text), and the page does not scroll sideways."""
    days = [Bar(f"{day:02d} Mar", value) for day, value in
            zip(range(1, 15), [0, 1_250, 30_000, 0, 7, 123_456, -2_000, 0, 0, 45_000, 9, 0, 310_000, 12_345])]
    page = tmp_path / "money.html"
    page.write_text(environment().from_string(PAGE).render(chart=bar_chart("spend per day", days, currency="EUR"),
                                                           who="spend"))
    try:
        for width, height in WIDTHS:
            set_viewport(browser, width, height)
            browser.get(page.as_uri())
            assert layout_problems(browser) == [], f"at {width} px"
            screenshots(browser, f"harness-money-chart-{width}px")
    finally:
        reset_viewport(browser)
