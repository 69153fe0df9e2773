"""Headless Chromium for the dashboards' tests, driven with Selenium: Debian's `chromium` and `chromium-driver`
(`./dev test` installs them when it runs as root). Without them, or without Selenium, every browser test skips and
its reason says which is missing and how to get it. Screenshots go under the test's own tmp directory; their paths
are printed (pytest -s, or the captured output of a failure)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
PAGE_LOAD_TIMEOUT_S = 30
ELEMENT_WAIT_S = 5
WINDOW = (1280, 1600)


def _which(names) -> str | None:
    search = os.environ.get("PATH", "") + ":/usr/bin:/usr/lib/chromium"
    return next((found for name in names if (found := shutil.which(name, path=search))), None)


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    lacking = [package for package, names in (("chromium", CHROMIUM_NAMES), ("chromium-driver", DRIVER_NAMES))
               if _which(names) is None]
    if lacking:
        how = "./dev test installs them when run as root" if os.geteuid() != 0 else \
            "./dev test could not install them (no apt-get, or no network?)"
        return f"{' and '.join(lacking)} not installed: {how}, or apt-get install chromium chromium-driver"
    return None


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """Where the module's browser saves what a page's download links fetch."""
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    """One headless Chromium per test module (the profile is fresh, so no cookies leak between modules)."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"browser test: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM_NAMES)
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")          # Chromium refuses to start its sandbox as root
    driver = webdriver.Chrome(service=Service(executable_path=_which(DRIVER_NAMES)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    driver.implicitly_wait(ELEMENT_WAIT_S)           # a form submitted by a click loads its answer asynchronously
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """``shoot(driver, name)`` saves a full-window PNG under this module's artifacts and prints its path;
    ``shoot(driver, name, whole=True)``: the whole page, as tall as it is, at the viewport's width."""
    folder = tmp_path_factory.mktemp("screenshots")

    def shoot(driver, name: str, whole: bool = False) -> Path:
        path = folder / f"{name}.png"
        if whole:
            width, height = driver.execute_script(
                "return [window.innerWidth, document.documentElement.scrollHeight]")
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": {
                "x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
            path.write_bytes(base64.b64decode(shot["data"]))
        else:
            assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
        print(f"screenshot of {name}: {path}")
        return path

    return shoot


def bar_values(driver, chart_id: str) -> list[int]:
    """The integers a server-drawn chart (node/web/charts.py) shows, read from the page's DOM."""
    from selenium.webdriver.common.by import By

    bars = driver.find_elements(By.CSS_SELECTOR, f"#{chart_id} rect.bar")
    return [int(bar.get_attribute("data-value")) for bar in bars]


def sign_in(driver, url: str, field: str, secret: str) -> None:
    """Fill a dashboard's sign-in form and submit it, as a person would, and wait for the page that answers."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, field).send_keys(secret)
    click_and_wait(driver, driver.find_element(By.ID, "sign-in"))


def click_and_wait(driver, element, timeout_s: float = 30) -> None:
    """Click a link or a form's button and wait until the page it leads to has loaded: click() returns before,
    and reading the page or its cookies at once can still see the old one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.llorchOldPage = true")          # gone once another page has loaded
    element.click()
    WebDriverWait(driver, timeout_s, ignored_exceptions=(WebDriverException,)).until(   # mid-navigation scripts fail
        lambda d: d.execute_script("return !window.llorchOldPage && document.readyState === 'complete'"))


def timed_get(driver, url: str) -> float:
    """Load ``url`` and return the page load time in ms as the browser measured it (navigation timing)."""
    driver.get(url)
    return driver.execute_script("const t = performance.getEntriesByType('navigation')[0];"
                                 "return t.loadEventEnd - t.startTime;")


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


# -- layout at a given width ----------------------------------------------------------------------------------------
WIDTHS = ((420, 900), (1400, 1000))      # the narrowest supported window (a phone held upright) and a desktop's
TEXT_PX_MIN = 10                         # the smallest text a page may render, charts' labels included


def set_viewport(driver, width: int, height: int) -> None:
    """Make the page's viewport exactly ``width`` × ``height`` CSS pixels (window.innerWidth == width), whatever
    the window's frame takes: DevTools' device-metrics override, as a phone would report it, scale 1."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def reset_viewport(driver) -> None:
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# Returns what a person would see wrong with the page's layout: the page scrolling sideways, an element sticking out
# of its card (a <section>) unless it is inside a box of its own that scrolls or clips (overflow-x), and text
# rendered smaller than the minimum: its computed font size times the scale of the SVG it sits in (a chart drawn
# with a viewBox shrinks its text with its width).
LAYOUT_SCRIPT = """
const minimum = arguments[0];
const report = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
                spilled: [], small: []};
const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
    (typeof e.className === 'string' && e.className ? '.' + e.className.trim().replace(/\\s+/g, '.') : '');
const scrolls = (e) => ['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(e).overflowX);
for (const section of document.querySelectorAll('main section')) {
  const right = section.getBoundingClientRect().right + 0.5;
  const walk = (e) => {
    for (const child of e.children) {
      const box = child.getBoundingClientRect();
      if (box.width > 0 && box.right > right) {
        report.spilled.push(`${name(child)} in section#${section.id}: ` +
                            `right ${box.right.toFixed(0)} > ${right.toFixed(0)}`);
      }
      if (!scrolls(child)) walk(child);
    }
  };
  walk(section);
}
for (const e of document.body.querySelectorAll('*')) {
  const text = [...e.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join('').trim();
  if (!text || e.closest('title, style, script') || e.getClientRects().length === 0) continue;
  let px = parseFloat(getComputedStyle(e).fontSize);
  if (e instanceof SVGGraphicsElement) {
    const m = e.getScreenCTM();
    px *= Math.min(Math.hypot(m.a, m.b), Math.hypot(m.c, m.d));
  }
  if (px < minimum - 0.01) report.small.push(`${name(e)} "${text.slice(0, 30)}": ${px.toFixed(1)} px`);
}
return report;
"""


def layout_problems(driver) -> list[str]:
    """What is wrong with the loaded page's layout at the current viewport (see LAYOUT_SCRIPT); [] when nothing."""
    report = driver.execute_script(LAYOUT_SCRIPT, TEXT_PX_MIN)
    problems = [f"the page scrolls sideways: scrollWidth {report['scrollWidth']} > innerWidth {report['innerWidth']}"] \
        if report["scrollWidth"] > report["innerWidth"] else []
    problems += [f"sticks out of its card: {spill}" for spill in report["spilled"]]
    problems += [f"text under {TEXT_PX_MIN} px: {small}" for small in report["small"]]
    return problems


def chart_ticks(driver, chart_id: str) -> tuple[list[str], list[str]]:
    """(the y axis's value labels, the x axis's labels) of the server-drawn chart in the element ``chart_id``."""
    from selenium.webdriver.common.by import By

    def texts(kind: str) -> list[str]:
        return [e.get_attribute("textContent").strip()
                for e in driver.find_elements(By.CSS_SELECTOR, f"#{chart_id} .chart text.{kind}")]

    return texts("y-tick"), texts("x-tick")
