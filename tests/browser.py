"""Headless Chromium for the report tests, the screenshots and the report benchmark: the system browser
(Debian packages ``chromium`` and ``chromium-driver``) driven by Selenium — nothing downloads a browser.

:func:`open_browser` returns a driver with the browser's console log enabled, or raises
:class:`NoBrowser` saying how to install one. ``SAE_DISCOVER_REQUIRE_BROWSER=1`` (set by ``.ci/run``)
makes a missing browser a failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil

INSTALL = "apt-get install -y chromium chromium-driver (and pip install -e '.[dev]' for selenium)"
BINARIES = (("chromium", "chromium-browser", "google-chrome"), ("chromedriver",))


class NoBrowser(RuntimeError):
    pass


def required() -> bool:
    return os.environ.get("SAE_DISCOVER_REQUIRE_BROWSER", "") not in ("", "0")


def _find(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def open_browser(width: int = 1400, height: int = 1000):
    """A headless Chromium (Selenium WebDriver) with its console log readable via ``get_log('browser')``."""
    try:
        from selenium import webdriver  # optional (dev extra): only the browser tests need it
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise NoBrowser(f"selenium is not installed: {INSTALL}") from exc
    binary, driver = _find(BINARIES[0]), _find(BINARIES[1])
    if binary is None or driver is None:
        raise NoBrowser(f"no headless Chromium here ({'chromium' if binary is None else 'chromedriver'} missing): "
                        f"{INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-background-networking", "--no-first-run",
                "--disable-component-update", "--disable-default-apps", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def browser_for_test(width: int = 1400, height: int = 1000):
    """:func:`open_browser` for a test: a missing browser skips it with the install line, or fails it when
    ``SAE_DISCOVER_REQUIRE_BROWSER`` is set (CI)."""
    import pytest  # only tests call this; the screenshot script and the benchmark use open_browser

    try:
        return open_browser(width, height)
    except NoBrowser as exc:
        if required():
            pytest.fail(f"SAE_DISCOVER_REQUIRE_BROWSER is set but {exc}")
        pytest.skip(str(exc))
