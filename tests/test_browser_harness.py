"""The browser harness itself: headless Chromium renders a server-drawn chart page (no network, no script) and the
page's numbers read back from the DOM are the ones it was given. Skips, saying why, without Chromium."""

from __future__ import annotations

from llorch.node.web.charts import Bar, bar_chart
from llorch.node.web.render import environment
from tests.browser import bar_values, browser, downloads, screenshots  # noqa: F401 (fixtures)

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
