"""The web page in a real headless Chromium: upload a photo, ask, see the answer and the marked photo.

Driven by Playwright with Debian's `chromium` (never a downloaded browser). Skipped, with the reason shown,
only where no Chromium binary exists. Set MCLLAVA_SCREENSHOT=path to keep the page's screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mcllava.server import ServerLimits, create_app
from mcllava.testing import make_bank, make_base, red_photo, serving

CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
        if p and Path(p).exists()
    ),
    None,
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUESTION = "Is <bo> in this photo?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary: apt-get install -y chromium"),
]  # a real headless browser


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer_dir):
    from mcllava.assistant import PersonalAssistant

    root = tmp_path_factory.mktemp("web")
    return PersonalAssistant.load(make_bank(make_base(tokenizer_dir, root / "base"), root / "bank"), str(root / "base"))


@contextmanager
def browsing(app, problems: list[str]) -> Iterator:
    """A headless Chromium page open at `app` (served on loopback); console errors and page errors go to `problems`."""
    from playwright.sync_api import sync_playwright

    with serving(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_page_uploads_a_photo_asks_and_shows_the_answer_and_marks(assistant, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "photo.png"
    red_photo(240).save(photo)
    (tmp_path / "concepts" / "bo" / "train").mkdir(parents=True)
    red_photo(96).save(tmp_path / "concepts" / "bo" / "train" / "0.png")
    app = create_app(assistant, limits=ServerLimits(max_new_tokens=8), concepts_dir=tmp_path / "concepts")
    expected = assistant.respond(red_photo(240), QUESTION, max_new_tokens=8).text

    problems: list[str] = []
    with browsing(app, problems) as page:
        expect(page.get_by_role("heading", name="Your concepts")).to_be_visible()
        concepts = page.locator("button.concept")
        expect(concepts).to_have_count(2)
        expect(concepts.first).to_contain_text("Bo")
        expect(page.locator("img.thumb")).to_have_count(1)  # Bo's thumbnail from the concept folder

        page.get_by_label("Question").fill("Is ")
        page.get_by_label("Question").press("End")
        concepts.first.click()  # inserts <bo> at the cursor
        page.get_by_label("Question").press_sequentially("in this photo?")
        expect(page.get_by_label("Question")).to_have_value(QUESTION)

        page.set_input_files("#photo", str(photo))
        expect(page.locator("#preview")).to_be_visible()
        page.get_by_role("button", name="Ask").click()

        expect(page.locator("#answer")).to_have_text(expected or "(empty answer)", timeout=30_000)
        marked = page.locator("#marked")
        expect(marked).to_be_visible()
        assert page.evaluate("document.getElementById('marked').naturalWidth") == 240
        expect(page.locator("#marks-caption")).to_have_text("Marks: 1 = Bo")
        expect(page.locator("#error")).to_be_hidden()
        shot = Path(os.environ.get("MCLLAVA_SCREENSHOT") or tmp_path / "web-page.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert problems == []


def test_page_picks_a_bank_from_the_models_list(tmp_path, tokenizer_dir):
    from playwright.sync_api import expect

    from mcllava.assistant import PersonalAssistant
    from mcllava.multibank import SharedBase

    base = make_base(tokenizer_dir, tmp_path / "base")
    bob = make_bank(
        base,
        tmp_path / "banks" / "bob",
        concepts={"kit": {"name": "Kit"}, "rex": {"name": "Rex"}, "zoe": {"name": "Zoe"}},
        seed=3,
    )
    make_bank(base, tmp_path / "banks" / "alice", seed=1)
    app = create_app(SharedBase.load([tmp_path / "banks"], str(base)), limits=ServerLimits(max_new_tokens=8))
    expected = PersonalAssistant.load(bob, str(base)).respond(None, "Who is <kit>?", max_new_tokens=8).text

    problems: list[str] = []
    with browsing(app, problems) as page:
        picker = page.get_by_label("Bank")
        expect(picker).to_be_visible()
        expect(picker.locator("option")).to_have_count(2)
        expect(page.locator("button.concept")).to_have_count(2)  # alice's, the first bank
        picker.select_option("bob")
        expect(page.locator("button.concept")).to_have_count(3)
        expect(page.locator("button.concept").first).to_contain_text("Kit")
        page.get_by_label("Question").fill("Who is <kit>?")
        page.get_by_role("button", name="Ask").click()
        expect(page.locator("#answer")).to_have_text(expected or "(empty answer)", timeout=30_000)
        expect(page.locator("#error")).to_be_hidden()
    assert problems == []
