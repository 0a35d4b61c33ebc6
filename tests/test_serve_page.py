"""The chat page at / in a real browser (Playwright driving Debian's chromium-headless-shell): a streamed
reply, Stop mid-reply, New chat, Regenerate, model output shown as text (never run as HTML), phone width.
Screenshots go to the test's tmp dir."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve tests need fastapi: pip install -e '.[dev]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need playwright: pip install -e '.[dev]'")

from chat_models import chat_tokenizer, random_chat_model, scripted_model  # noqa: E402
from serve_helpers import serving  # noqa: E402

from gptforge.chat.tokens import encode_chat_prompt  # noqa: E402
from gptforge.serve import create_app  # noqa: E402

CANDIDATES = [os.environ.get("GPTFORGE_CHROMIUM", ""), shutil.which("chromium-headless-shell") or "",
              "/usr/lib/chromium/chromium-headless-shell", shutil.which("chromium") or ""]
BROWSER = next((path for path in CANDIDATES if path and os.path.exists(path)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium: apt-get install -y "
                                "--no-install-recommends chromium-headless-shell (or set GPTFORGE_CHROMIUM)")

XSS = '<img src=x onerror="window.__xss=1"><b>bold</b>'


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"], timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def scripted():
    """A model whose greedy reply to a first message "hi" (no system prompt) is the XSS text, then end."""
    tok = chat_tokenizer("char")
    start = len(encode_chat_prompt(tok, [{"role": "user", "content": "hi"}]))
    reply = tok.encode(XSS) + [tok.special_tokens["<|im_end|>"]]
    model = scripted_model(tok.vocab_size, {start - 1 + i: t for i, t in enumerate(reply)}, block_size=512,
                           default=tok.special_tokens["<|im_end|>"])
    app = create_app(model, tok, name="scripted")
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def slow():
    """A model that writes (greedily) until max_tokens (1000), slowly enough to stop mid-reply."""
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=[1023], block_size=1024, n_embd=384)
    app = create_app(model, tok, name="slow")
    with serving(app) as url:
        yield url, app


def _open(browser, url, width=1000, height=800):
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function needs
    page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
    page.set_default_timeout(20_000)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.click("summary")  # open the settings
    return page


def _send(page, text):
    page.fill("#input", text)
    page.click("#send")


def _settle(page):
    page.wait_for_function("document.getElementById('stop').disabled && !document.getElementById('send').disabled")


def test_reply_is_shown_as_text_and_never_run(browser, scripted, tmp_path):
    page = _open(browser, scripted)
    page.fill("#temperature", "0")
    _send(page, "hi")
    _settle(page)
    page.screenshot(path=str(tmp_path / "reply.png"))
    assert page.locator(".msg").all_text_contents()[0] == "hi", page.locator(".msg").all_text_contents()
    assert page.locator(".msg.assistant").all_text_contents() == [XSS], page.locator(".msg").all_text_contents()
    assert page.locator("#log img, #log b").count() == 0  # text, not elements
    assert page.evaluate("window.__xss") is None
    # Regenerate: the last reply is replaced by a new one (greedy: the same), not added
    page.click("#regen")
    _settle(page)
    assert page.locator(".msg").all_text_contents() == ["hi", XSS]
    # New chat: the conversation is gone, so "hi" is again a first message and gets the same reply
    page.click("#new")
    assert page.locator(".msg").count() == 0
    _send(page, "hi")
    _settle(page)
    assert page.locator(".msg").all_text_contents() == ["hi", XSS]
    page.close()


def test_stop_ends_the_streamed_reply_and_the_generation(browser, slow, tmp_path):
    url, app = slow
    page = _open(browser, url)
    page.fill("#max-tokens", "1000")
    page.fill("#temperature", "0")  # greedy: this model's reply to "hello" never ends before max_tokens
    _send(page, "hello")
    reply = page.locator(".msg.assistant")
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length >= 5")
    seen = len(reply.text_content())
    page.wait_for_function(f"document.querySelector('.msg.assistant').textContent.length > {seen}")  # streaming
    page.click("#stop")
    _settle(page)
    page.screenshot(path=str(tmp_path / "stopped.png"))
    batcher = app.state.batcher
    deadline = time.monotonic() + 10
    while batcher.rows:  # the server stopped generating for the aborted request
        assert time.monotonic() < deadline
        time.sleep(0.01)
    shown = reply.text_content()
    time.sleep(0.3)
    assert reply.text_content() == shown and 5 <= len(shown) < 1000
    # the stopped reply stays in the conversation; the page is ready for the next message
    assert page.locator(".msg").count() == 2 and not page.is_disabled("#send")
    page.close()


def test_usable_at_phone_width(browser, scripted, tmp_path):
    page = _open(browser, scripted, width=375, height=740)
    page.fill("#temperature", "0")
    _send(page, "hi")
    _settle(page)
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than the screen
    for selector in ("#input", "#send", "#stop", "#new", "#regen"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
    page.close()


PLACEHOLDER_FITS = """() => {
    // the placeholder laid out as the textarea lays it out (its font, its content width): does it fit its height?
    const input = document.getElementById("input"), style = getComputedStyle(input);
    const probe = document.createElement("div");
    probe.textContent = input.placeholder;
    probe.style.cssText = "position:absolute; visibility:hidden; white-space:pre-wrap; overflow-wrap:break-word";
    probe.style.font = style.font;
    probe.style.width = (input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) + "px";
    document.body.appendChild(probe);
    const needed = probe.getBoundingClientRect().height;
    probe.remove();
    const room = input.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    return {needed, room, placeholder: input.placeholder};
}"""


@pytest.mark.parametrize("width, height", [(390, 844), (1000, 800)])
def test_the_message_box_shows_its_whole_placeholder(browser, scripted, tmp_path, width, height):
    """At phone width (390x844) the one-row box clipped its placeholder (three lines' worth in one row): the
    page fits it; at desktop width the whole hint (Enter, Shift+Enter) is shown."""
    page = _open(browser, scripted, width=width, height=height)
    page.screenshot(path=str(tmp_path / f"input-{width}.png"))
    fit = page.evaluate(PLACEHOLDER_FITS)
    assert fit["placeholder"] and fit["needed"] <= fit["room"] + 0.5, fit
    if width >= 1000:
        assert "Shift+Enter" in fit["placeholder"], fit
    page.close()


def test_max_tokens_above_the_context_is_clamped_before_sending(browser, tmp_path):
    """A typed max tokens above the model's context (64 here) was sent as it was and came back as a red 400
    bubble: the page sends the context instead, and shows that it did."""
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(64)), block_size=64)  # every reply ends at once
    app = create_app(model, tok, name="short")
    with serving(app) as url:
        page = _open(browser, url)
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
        page.fill("#max-tokens", "1000")
        _send(page, "hi")
        _settle(page)
        page.screenshot(path=str(tmp_path / "clamped.png"))
        assert page.locator(".msg.error").count() == 0, page.locator(".msg").all_text_contents()
        assert [body["max_tokens"] for body in sent] == [64] and page.input_value("#max-tokens") == "64"
        page.close()


def test_a_conversation_longer_than_the_context_drops_its_oldest_exchanges(browser, tmp_path):
    """A 64-token model: max tokens defaults to half its context, and once the conversation no longer fits,
    the page leaves out the oldest exchanges (as `gptforge chat` does) instead of failing."""
    tok = chat_tokenizer("char")
    model = random_chat_model(tok, end_at=list(range(64)), block_size=64)  # every reply ends at once
    app = create_app(model, tok, name="short")
    with serving(app) as url:
        page = _open(browser, url)
        assert page.input_value("#max-tokens") == "32"
        for i in range(5):
            _send(page, f"message {i} abcdefghij")
            _settle(page)
        page.screenshot(path=str(tmp_path / "long.png"))
        assert page.locator(".msg.error").count() == 0
        assert page.locator(".msg.user").all_text_contents() == [f"message {i} abcdefghij" for i in range(5)]
        assert page.locator(".msg.assistant").count() == 5
        page.close()
