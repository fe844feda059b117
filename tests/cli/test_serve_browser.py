"""`deepforcing serve` driven by a real browser: headless Chromium through selenium (Debian's `chromium` and
`chromium-driver`). Start shows blocks of frames before the run ends; a mid-stream switch changes the frames after
the boundary while those before equal an unswitched run's (decoded pixels against the pipeline's own output);
Stop, then the downloaded mp4 decodes to the expected frame count; two tabs never mix frames; a bad length shows
its message and the next Start works.

Skipped only when the browser is missing and DEEPFORCING_REQUIRE_BROWSER is unset (CI sets it, and installs the
browser, so there these tests cannot silently skip)."""
import os

import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")
pytest.importorskip("PIL")

from deepforcing_kernels.serve import browser as page  # noqa: E402

_, _, MISSING = page.find_browser()
if MISSING and os.environ.get("DEEPFORCING_REQUIRE_BROWSER") != "1":
    pytest.skip(f"no headless browser here ({', '.join(MISSING)} missing)", allow_module_level=True)

from serve_support import LAT, decode_blocks, start_server, wait_for  # noqa: E402

if not MISSING:  # else the fixture below fails the tests with what is missing
    from selenium.webdriver.common.by import By

from deepforcing_kernels.pipeline import VideoPipeline  # noqa: E402
from deepforcing_kernels.video.writer import frames_to_uint8  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def chrome(download_dir=None):
    """A headless Chromium under selenium (the driver named explicitly: nothing is downloaded)."""
    if MISSING:
        pytest.fail(f"DEEPFORCING_REQUIRE_BROWSER=1 but {', '.join(MISSING)} missing: install chromium "
                    "chromium-driver (apt) and selenium (pip)")
    return page.chrome(download_dir)


@pytest.fixture(scope="module")
def server():
    srv = start_server(max_streams=2)
    yield srv
    srv.close_all()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    d = chrome(downloads)
    yield d
    d.quit()


_start = page.start_run


def _open(browser, server):
    page.open_page(browser, server.url)


def _ended(browser, timeout=60):
    assert wait_for(lambda: browser.execute_script("return window.df.end") is not None, timeout, step=0.1)
    return browser.execute_script("return window.df.end")


def _pixels(browser):
    return decode_blocks(browser.execute_script("return window.df.sprites"))


def _pipeline_pixels(seed, prompt, frames, **kw):
    pipe = VideoPipeline.tiny(seed, latent_size=LAT)
    return frames_to_uint8(torch.cat([c.frames for c in pipe.frames(prompt, frames, seed=seed, progress=False,
                                                                      **kw)], 1))


def test_start_shows_blocks_of_frames_before_the_run_ends(browser, server):
    _open(browser, server)
    _start(browser, "a red fox", 45, seed=0)
    end = _ended(browser)
    df = browser.execute_script("return {blocks: df.blocks, tEnd: df.tEnd, tClick: df.tClick, "
                                "tFirst: df.tFirstShown, shown: df.shown}")
    assert end["state"] == "done" and len(df["blocks"]) == 15
    before = [b for b in df["blocks"] if b["t"] < df["tEnd"]]
    assert len(before) >= 2
    # frames arrived block by block over the run, not all at its end, and the page showed one before the end
    assert df["blocks"][0]["t"] < df["blocks"][-1]["t"] and df["tFirst"] is not None and df["tFirst"] < df["tEnd"]
    lit = browser.execute_script("const c = document.getElementById('view'); return Array.from(c.getContext('2d')"
                                 ".getImageData(0, 0, c.width, c.height).data).some(v => v > 0)")
    assert lit  # the canvas shows a frame
    kinds = [e.get_attribute("class") for e in browser.find_elements(By.CSS_SELECTOR, "#cache .slot")]
    assert {"slot sink", "slot topc", "slot recent"} <= set(kinds)  # the cache picture of the last block
    assert (_pixels(browser) == _pipeline_pixels(0, "a red fox", 45)).all()


def test_switch_mid_stream_then_stop_and_download_the_mp4(browser, server, downloads):
    _open(browser, server)
    _start(browser, "a red fox", 90, seed=5)
    assert wait_for(lambda: browser.execute_script("return df.blocks.length") >= 1, 30)
    box = browser.find_element(By.ID, "switch-prompt")
    box.send_keys("a blue whale")
    browser.find_element(By.ID, "recache").click()
    browser.find_element(By.ID, "switch").click()
    switched = "return df.blocks.find(b => b.switched) || null"
    assert wait_for(lambda: browser.execute_script(switched) is not None, 30)
    browser.find_element(By.ID, "stop").click()
    end = _ended(browser)
    sw = browser.execute_script(switched)["latent_start"]
    latent = end["latent_frames"]
    assert end["state"] == "stopped" and 0 < sw < latent < 90
    got = _pixels(browser)
    plain = _pipeline_pixels(5, "a red fox", latent)
    cut = 1 + 4 * (sw - 1)
    assert got.shape == plain.shape and (got[:cut] == plain[:cut]).all()
    assert not (got[cut:] == plain[cut:]).all()
    assert (got == _pipeline_pixels(5, "a red fox", latent, switches=[(sw, "a blue whale")], recache=True)).all()
    # the download: the mp4 of the frames made, decodable, never the page's frames re-encoded
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed()
    link.click()
    assert wait_for(lambda: [p for p in downloads.iterdir() if p.suffix == ".mp4"], 30)
    mp4 = next(p for p in downloads.iterdir() if p.suffix == ".mp4")
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == end["frames"] == 1 + 4 * (latent - 1) == len(got)
    assert "--switch" in end["command"] and "--recache" in end["command"]


def test_two_tabs_at_once_never_mix_frames(browser, server):
    _open(browser, server)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    _open(browser, server)
    browser.switch_to.window(first)
    _start(browser, "tab one", 36, seed=1)
    browser.switch_to.window(second)
    _start(browser, "tab two", 36, seed=2, policy="sliding")
    got = {}
    for tab, want in ((second, (2, "tab two", "sliding")), (first, (1, "tab one", "deep_forcing"))):
        browser.switch_to.window(tab)
        assert _ended(browser)["state"] == "done"
        got[tab] = _pixels(browser)
    pipe = VideoPipeline.tiny(2, latent_size=LAT, policy="sliding")
    two = frames_to_uint8(torch.cat([c.frames for c in pipe.frames("tab two", 36, seed=2, progress=False)], 1))
    assert (got[first] == _pipeline_pixels(1, "tab one", 36)).all() and (got[second] == two).all()
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)
    assert wait_for(lambda: len(server.app.sessions) <= 1, 20)  # the closed tab's session went with it


def test_a_bad_length_shows_its_message_and_the_next_start_works(browser, server):
    _open(browser, server)
    _start(browser, "a red fox", 10)
    msg = browser.find_element(By.ID, "message")
    assert wait_for(lambda: "multiple of 3" in msg.text, 10)
    assert browser.find_element(By.ID, "start").is_enabled()
    _start(browser, "a red fox", 6)
    end = _ended(browser)
    assert end["state"] == "done" and end["frames"] == 21 and msg.text == ""
    assert server.app.errors == 0 and server.logs == []
