"""The web playground in a real headless browser (Playwright driving Debian's chromium): type a prompt,
press Generate, watch the text stream in; the screenshot is kept in test-artifacts/."""
import shutil
from pathlib import Path

import pytest


sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# An offline machine: no background networking, sync or component updates (their connections fail).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)")
def test_type_a_prompt_press_generate_and_see_the_text_stream(served):
    lm, server = served
    ARTIFACTS.mkdir(exist_ok=True)
    # a seed whose sample runs long enough to stream (a tiny model may end its text after a letter)
    seed = next(s for s in range(3, 40) if len(lm.generate("Emma", 300, temperature=0.8, top_p=0.95, seed=s)) >= 100)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_selector("#info dt")
            assert "transformer" in page.inner_text("#title")
            assert f"{lm.evaluate()['bits_per_byte']:.3f} bits per byte" in page.inner_text("#info")
            page.fill("#key", "test-key")
            page.fill("#prompt", "Emma")
            page.fill("#seed", str(seed))
            page.fill("#max_tokens", "300")
            page.evaluate("""() => { window.updates = 0;
                new MutationObserver(() => window.updates++).observe(document.querySelector('#output .new'),
                    {childList: true, characterData: true, subtree: true}); }""")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#generate').disabled === false "
                                   "&& document.querySelector('#output .new').textContent.length > 0", timeout=60000)
            shown = page.inner_text("#output .new")
            updates = page.evaluate("window.updates")
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            # Ctrl+Enter while a generation streams starts no second one writing into the same text
            page.evaluate("""() => { document.querySelector('#generate').click();
                document.querySelector('#prompt').dispatchEvent(
                    new KeyboardEvent('keydown', {key: 'Enter', ctrlKey: true})); }""")
            page.wait_for_function("document.querySelector('#generate').disabled === false", timeout=60000)
            again = page.inner_text("#output .new")
            page.fill("#stopstr", r"\n\n or \\n")  # typed escapes, as `generate --stop` reads them
            stops = page.evaluate("request().stop")
        finally:
            browser.close()
    assert stops == ["\n\n or \\n"]
    expected = lm.generate("Emma", 300, temperature=0.8, top_p=0.95, seed=seed)
    assert shown == expected and again == expected
    assert updates >= 3  # the text arrived piece by piece, not all at the end (one update)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
