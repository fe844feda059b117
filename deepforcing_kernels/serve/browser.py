"""Drive the ``deepforcing serve`` page from Python: an in-process server on a free port and headless Chromium
through selenium (the browser tests, ``benchmarks/bench_serve.py`` and the page's screenshot use these).

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (named explicitly: selenium downloads
nothing); selenium is the ``serve-test`` extra. Importing this module needs neither.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

__all__ = ["find_browser", "chrome", "start_server", "wait_until", "open_page", "start_run"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> Tuple[Optional[str], Optional[str], List[str]]:
    """``(chromium path, chromedriver path, names of what is missing)``; selenium counts as one of them."""
    binary = next((p for p in map(shutil.which, _BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        have_selenium = True
    except ImportError:
        have_selenium = False
    missing = [n for n, ok in (("chromium", binary), ("chromedriver", driver), ("selenium", have_selenium)) if not ok]
    return binary, driver, missing


def chrome(download_dir: Optional[Union[str, Path]] = None, size: Tuple[int, int] = (1100, 900)) -> Any:
    """A headless Chromium under selenium; downloads (the page's mp4 link) go to ``download_dir`` if given.
    RuntimeError naming what is missing."""
    binary, driver, missing = find_browser()
    if missing:
        raise RuntimeError(f"no headless browser: {', '.join(missing)} missing (apt-get install chromium "
                           "chromium-driver; pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={size[0]},{size[1]}", "--disable-extensions", "--mute-audio"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    if download_dir is not None:
        d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return d


def start_server(host: str = "127.0.0.1", port: int = 0, **options: Any) -> Any:
    """A server running in a daemon thread of this process (port 0: a free one). ``server.url`` is its page,
    ``server.app`` the :class:`~deepforcing_kernels.serve.ServeApp`, ``server.logs`` the error lines it logged;
    ``server.close_all()`` ends it. ``options`` are :class:`~deepforcing_kernels.serve.ServeOptions` fields."""
    from .app import ServeApp, ServeOptions
    from .http import make_server

    logs: List[str] = []
    app = ServeApp(ServeOptions(**options), log=logs.append)
    srv = make_server(app, host, port)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.logs = logs
    srv.url = "http://%s:%d" % srv.server_address[:2]
    return srv


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, step: float = 0.1) -> Any:
    """``cond()``'s first true value within ``timeout`` seconds, else None. Each look at a page is a driver round
    trip: polling much faster than ``step = 0.1`` takes the cores a measurement runs on."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return None


def open_page(driver: Any, url: str, timeout: float = 20.0) -> None:
    """Load the page and wait for its event stream's session; TimeoutError if it never comes."""
    driver.get(url.rstrip("/") + "/")
    if wait_until(lambda: driver.execute_script("return window.df && window.df.sid"), timeout) is None:
        raise TimeoutError(f"the page at {url} did not open its event stream within {timeout:g} s")


def start_run(driver: Any, prompt: str, frames: int, seed: int = 0, policy: str = "deep_forcing") -> None:
    """Fill the page's form as a user types it and press Start."""
    from selenium.webdriver.common.by import By

    for el, value in (("prompt", prompt), ("frames", str(frames)), ("seed", str(seed))):
        e = driver.find_element(By.ID, el)
        e.clear()
        e.send_keys(value)
    driver.execute_script(f"document.getElementById('policy').value = {policy!r}")
    driver.find_element(By.ID, "start").click()
