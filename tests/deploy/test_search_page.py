"""The search page of `ctxsim serve`, driven in a real Chromium with Playwright (marker ``browser``).

Real servers on loopback (tests/deploy/serve_helpers.running) serve the flat index over 240 real Omniglot drawings;
the page is used as a person would: a file picked in its file input, a result clicked, a token typed. Skips where
Playwright (``pip install 'ctxsim[browser]'``) or a Chromium (``apt-get install chromium``; Playwright's own browser
download is not used; ``CTXSIM_CHROMIUM`` names another binary) is missing. A failing test saves a screenshot
under pytest's temporary folder and prints its path. ``CTXSIM_WRITE_SCREENSHOT=1`` also writes the README's
docs/images/search_page.png.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: pip install "
                                                             "'ctxsim[browser]'")

from serve_helpers import png, running  # noqa: E402

pytestmark = pytest.mark.browser

TOKEN = "page-token"
MAX_PIXELS = 10_000  # the drawings are 28x28; a 200x200 upload is refused (413)
REPO = Path(__file__).resolve().parents[2]
README_SHOT = REPO / "docs" / "images" / "search_page.png"
expect = sync_api.expect


def _chromium() -> str | None:
    named = os.environ.get("CTXSIM_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine: apt-get install chromium, or set CTXSIM_CHROMIUM to a Chromium binary",
                allow_module_level=True)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, request, tmp_path_factory):
    """A fresh tab (its own sessionStorage); a screenshot of it is saved when the test fails."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    failed_before = request.session.testsfailed
    yield tab
    if request.session.testsfailed > failed_before:  # this test's call phase failed (reported before teardown)
        shot = tmp_path_factory.mktemp("screenshots") / f"{request.node.name}.png"
        try:
            tab.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot of the failed page: {shot}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - the failure itself matters more
            print(f"\nno screenshot ({e})", file=sys.stderr)
    context.close()
    assert not errors, f"uncaught JavaScript errors: {errors}"


def _app(index, token=None, reload_every_s=0.0):
    from ctxsim.deploy import create_app

    return create_app(index, token=token, max_pixels=MAX_PIXELS, max_batch=8, batch_wait_ms=2,
                      reload_every_s=reload_every_s, device="cpu")


@pytest.fixture(scope="module")
def plain(flat_index):
    with running(_app(flat_index)) as url:
        yield url


@pytest.fixture(scope="module")
def guarded(flat_index):
    with running(_app(flat_index, token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def index(flat_index):
    from ctxsim.deploy import load_index

    return load_index(flat_index)


def _query(index, n: int = 37):
    """A gallery file and its item id."""
    it = index.items[n]
    return Path(it.path), it.id


def _ids(tab) -> list[int]:
    return [int(x) for x in tab.locator("#results li").evaluate_all("els => els.map(e => e.dataset.id)")]


def _thumbs_loaded(tab) -> None:
    tab.wait_for_function("() => { const imgs = [...document.querySelectorAll('#results img.thumb')];"
                          " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


# ---------------------------------------------------------------------------------------------- tests
def test_upload_shows_top_k_with_the_query_first(page, plain, index):
    query, qid = _query(index)
    page.goto(f"{plain}/")
    expect(page.locator("#served-count")).to_have_text("240")
    expect(page.locator("#served-index")).to_have_text("flat")
    expect(page.locator("#served-backend")).to_have_text(re.compile(r"^torch"))
    expect(page.locator("#served-precision")).to_have_text("fp32")
    expect(page.locator("#served-parity")).to_have_text("reference (PyTorch fp32)")
    expect(page.locator("#served-generation")).to_have_text(str(index.info.generation))
    expect(page.locator("#served-fingerprint")).to_have_attribute("title", index.fingerprint)

    page.fill("#k", "6")
    page.set_input_files("#file", str(query))
    results = page.locator("#results li")
    expect(results).to_have_count(6)
    first = results.nth(0)
    expect(first).to_have_attribute("data-id", str(qid))
    expect(first.locator(".rank")).to_have_text("#1")
    assert float(first.locator(".score").inner_text()) > 0.999
    expect(first.locator(".label")).to_have_text(index.items[qid].label)
    expect(first.locator(".name")).to_have_text(query.name)
    expect(results.nth(5).locator(".rank")).to_have_text("#6")
    expect(page.locator("#query-caption")).to_contain_text(query.name)
    expect(page.locator("#message")).to_be_hidden()
    _thumbs_loaded(page)

    api = httpx.post(f"{plain}/search", files={"image": (query.name, query.read_bytes(), "image/png")},
                     data={"k": "6"}, timeout=30).json()
    assert _ids(page) == [h["id"] for h in api["results"]]  # the page shows what the API answers

    if os.environ.get("CTXSIM_WRITE_SCREENSHOT") == "1":  # the README's picture, from this very run
        page.fill("#k", "10")
        page.locator("#k").dispatch_event("change")
        expect(results).to_have_count(10)
        _thumbs_loaded(page)
        page.set_viewport_size({"width": 1200, "height": 620})  # two rows of five, no empty band below
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SHOT))
        print(f"\nwrote {README_SHOT}", file=sys.stderr)


def test_clicking_a_result_searches_with_it(page, plain, index):
    query, qid = _query(index, 101)
    page.goto(f"{plain}/")
    page.fill("#k", "5")
    page.set_input_files("#file", str(query))
    results = page.locator("#results li")
    expect(results).to_have_count(5)
    picked = int(results.nth(2).get_attribute("data-id"))
    assert picked != qid
    results.nth(2).locator("button").click()

    expect(page.locator("#query")).to_have_attribute("data-id", str(picked))
    expect(page.locator("#query")).to_have_attribute("data-kind", "item")
    expect(page.locator("#query-caption")).to_contain_text(Path(index.items[picked].path).name)
    expect(results.nth(0)).to_have_attribute("data-id", str(picked))  # its own gallery image first
    expect(results.nth(0)).to_have_class(re.compile(r"\bself\b"))
    expect(results).to_have_count(5)
    page.wait_for_function("() => document.getElementById('query-img').src.startsWith('blob:')")
    similar = httpx.get(f"{plain}/items/{picked}/similar", params={"k": 5}, timeout=30).json()
    assert _ids(page) == [h["id"] for h in similar["results"]]


def test_token_is_asked_for_once_and_a_401_asks_again(page, guarded, index):
    query, qid = _query(index)
    page.goto(f"{guarded}/")  # the page itself needs no token
    form = page.locator("#token-form")
    expect(form).to_be_visible()
    expect(page.locator("#token-prompt")).to_have_text("This server needs a token.")

    page.fill("#token-input", "wrong-token")
    page.press("#token-input", "Enter")
    expect(page.locator("#token-prompt")).to_have_text(re.compile("refused that token"))
    expect(form).to_be_visible()

    page.fill("#token-input", TOKEN)
    page.click("#token-form button")
    expect(form).to_be_hidden()
    expect(page.locator("#served-count")).to_have_text("240")
    page.set_input_files("#file", str(query))
    expect(page.locator("#results li")).to_have_count(10)
    expect(page.locator("#results li").nth(0)).to_have_attribute("data-id", str(qid))
    _thumbs_loaded(page)  # thumbnails are fetched with the token too
    assert page.evaluate("sessionStorage.getItem('ctxsim.token')") == TOKEN

    page.reload()  # kept for the tab: no second prompt
    expect(page.locator("#served-count")).to_have_text("240")
    expect(form).to_be_hidden()

    page.evaluate("sessionStorage.setItem('ctxsim.token', 'stale')")  # e.g. the server's token was changed
    page.set_input_files("#file", str(query))
    expect(form).to_be_visible()
    expect(page.locator("#token-prompt")).to_have_text(re.compile("refused that token"))
    expect(page.locator("#status")).to_have_text("Enter the token to search.")
    page.fill("#token-input", TOKEN)
    page.press("#token-input", "Enter")  # the search that was refused runs again
    expect(page.locator("#results li")).to_have_count(10)


def test_refused_uploads_read_as_sentences(page, plain, tmp_path):
    page.goto(f"{plain}/")
    expect(page.locator("#served-count")).to_have_text("240")
    message = page.locator("#message")

    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels\n")
    page.set_input_files("#file", str(notes))
    expect(message).to_be_visible()
    expect(message).to_have_text(re.compile(r"^Not an image \(415\): not a readable image"))
    assert "{" not in message.inner_text()
    expect(page.locator("#results li")).to_have_count(0)

    big = tmp_path / "big.png"
    big.write_bytes(png(200, 200, seed=3))
    page.set_input_files("#file", str(big))
    expect(message).to_have_text(re.compile(r"^Too large \(413\): .*max_pixels.*\(limit max_pixels = 10,000, this "
                                            r"image: 40,000\)"))

    page.fill("#k", "0")
    page.set_input_files("#file", str(big))
    expect(message).to_have_text(re.compile(r"number of results must be a whole number from 1 to 1000"))


def test_phone_sized_screen(browser, plain, index, request, tmp_path_factory):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    try:
        query, qid = _query(index)
        tab.goto(f"{plain}/")
        tab.set_input_files("#file", str(query))
        results = tab.locator("#results li")
        expect(results).to_have_count(10)
        expect(results.nth(0)).to_have_attribute("data-id", str(qid))
        assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        boxes = [results.nth(i).bounding_box() for i in range(3)]
        assert boxes[0]["y"] == boxes[1]["y"] < boxes[2]["y"]  # two results a row
        assert boxes[0]["width"] > 120
        drop = tab.locator("#drop").bounding_box()
        assert drop["x"] >= 0 and drop["x"] + drop["width"] <= 390
    except Exception:
        shot = tmp_path_factory.mktemp("screenshots") / "phone.png"
        tab.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot of the failed page: {shot}", file=sys.stderr)
        raise
    finally:
        context.close()


def test_the_page_notices_a_hot_reload(page, flat_index, extra_dir, index, tmp_path):
    from ctxsim.deploy import add_to_index

    folder = tmp_path / "index"
    shutil.copytree(flat_index, folder)
    generation = index.info.generation
    with running(_app(folder, reload_every_s=0.2)) as url:
        page.goto(f"{url}/?poll=0.5")
        expect(page.locator("#served-generation")).to_have_text(str(generation))
        query, qid = _query(index)
        page.set_input_files("#file", str(query))
        expect(page.locator("#results li")).to_have_count(10)

        add_to_index(folder, extra_dir)  # 40 more drawings: a new generation, picked up without a restart
        expect(page.locator("#served-generation")).to_have_text(str(generation + 1))
        expect(page.locator("#served-count")).to_have_text("280")
        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(f"generation {generation + 1}, 280 items")
        page.click("#notice-again")
        expect(notice).to_be_hidden()
        expect(page.locator("#results li").nth(0)).to_have_attribute("data-id", str(qid))
        _thumbs_loaded(page)
