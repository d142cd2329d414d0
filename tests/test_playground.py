"""The web playground in a real browser: Debian's headless Chromium, driven by Playwright, against a
real `jaxserve serve` of two tiny random models behind API keys and a --root-path. The page streams an
answer, stops it (the server aborts the request), switches models, regenerates, keeps the key, reads
every error as a message and never trips the server's Content-Security-Policy. It leaves a screenshot
in test-artifacts/playground.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.server_process import DEADLINE, ServerProcess, get, wait_for
from tests.tiny_models import tiny_config, tiny_params, write_hf_folder

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

# Debian's Chromium as it is, offline: never a downloaded browser (`playwright install`).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY, ADMIN = "sk-playground-user", "sk-playground-admin"  # a user's key, and an admin tenant's (reads /metrics)
ROOT = "/playground"
CONTEXT = 4096  # room for a stream long enough to stop halfway
SCREENSHOT = Path(__file__).resolve().parents[1] / "test-artifacts" / "playground.png"
# Every CSP violation the page meets, reported on the console (the browser logs its own "Refused to ..." too).
WATCH_CSP = "document.addEventListener('securitypolicyviolation', (e) => console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Models `tiny-a` and `tiny-b` (version v2, so also `tiny-b@v2`), random answers that ignore EOS
    and run to max_tokens; a user key and an admin key; every route also under ROOT."""
    folder = tmp_path_factory.mktemp("playground")
    cfg = tiny_config(max_position_embeddings=CONTEXT)
    for seed in (0, 1):
        write_hf_folder(folder / f"seed{seed}", cfg, tiny_params(cfg, seed=seed))
    models = [{"name": "tiny-a", "model": str(folder / "seed0")}, {"name": "tiny-b", "model": str(folder / "seed1"), "version": "v2"}]
    (folder / "serve.yaml").write_text(yaml.safe_dump({"models": models}))
    (folder / "keys.yaml").write_text(yaml.safe_dump({"keys": {KEY: {"tenant": "user"}, ADMIN: {"tenant": "ops", "admin": True}}}))
    args = ["--config", str(folder / "serve.yaml"), "--api-keys-file", str(folder / "keys.yaml"), "--root-path", ROOT, "--ignore-eos",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--num-pages", "320", "--max-model-len", str(CONTEXT), "--no-warmup"]
    with ServerProcess(args, folder / "log.txt") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    expect.set_options(timeout=DEADLINE * 1000)  # a first answer may compile its step shapes first
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """A page in a fresh browser context (empty localStorage) that records CSP violations, uncaught
    script errors and the URL of every request."""

    def __init__(self, browser, width: int = 1200, height: int = 760) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height}, color_scheme="light")
        self.context.set_default_timeout(DEADLINE * 1000)
        self.context.add_init_script(WATCH_CSP)
        self.page = self.context.new_page()
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message) -> None:
        if message.text.startswith("CSP violation") or "Content Security Policy" in message.text:
            self.violations.append(message.text)

    def __call__(self, test_id: str):
        """The element with that data-testid (the last one, for answers and errors)."""
        return self.page.get_by_test_id(test_id).last

    def ask(self, text: str) -> None:
        self("message-input").fill(text)
        self("send").click()

    def close(self) -> None:
        self.context.close()


def metric(server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent), read with the admin key."""
    status, text = get(server.url + "/metrics", ADMIN)
    assert status == 200, text
    for line in text.splitlines():
        match = re.fullmatch(r"([^{\s]+)\{(.*)\} (\S+)", line)
        if match and match[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', match[2])) == labels:
            return float(match[3])
    return 0.0


def answered(tokens: int) -> re.Pattern:
    """The stats line of a whole answer of `tokens` tokens."""
    return re.compile(rf"^{tokens} tokens · [\d.]+ tok/s · TTFT \d+ ms · length$")


def test_streams_stops_switches_models_and_regenerates_under_a_root_path(server, browser) -> None:
    tab = Tab(browser)
    page = tab.page
    response = page.goto(server.url + ROOT)
    assert page.url == server.url + ROOT + "/"  # the bare prefix redirects to the page
    assert "script-src 'self'" in response.headers["content-security-policy"]

    # No key yet: the model list's 401 is a message, and the key field asks for the key.
    expect(tab("error")).to_contain_text("401")
    expect(tab("api-key")).to_be_focused()
    expect(tab("api-key")).to_have_class(re.compile("attention"))
    tab("api-key").fill(KEY)
    tab("api-key").press("Tab")
    models = page.locator("#model option")
    expect(models).to_have_count(3)
    assert models.all_text_contents() == ["tiny-a", "tiny-b", "tiny-b@v2"]
    expect(page.get_by_test_id("error")).to_have_count(0)
    expect(tab("model-info")).to_have_text(f"ready · {CONTEXT}-token context")

    # A long answer streams in: the text grows while the stream is open; Stop aborts it on the server.
    labels, b = {"model_name": "tiny-a", "version": "default"}, {"model_name": "tiny-b", "version": "v2"}
    aborted, finished = (metric(server, "jaxserve:request_success_total", **labels, finished_reason=r) for r in ("abort", "length"))
    generated, routed = metric(server, "jaxserve:generation_tokens_total", **labels), metric(server, "jaxserve:routed_requests_total", **b)
    long = CONTEXT - 100
    tab("max-tokens").fill(str(long))
    tab.ask("Tell me a long story.")
    lengths = [0]

    def grown() -> bool:
        n = len(tab("answer-text").text_content())
        if n > lengths[-1]:
            lengths.append(n)
        return len(lengths) > 3

    wait_for(grown, "the answer to grow three times", interval=0.02)
    assert tab("stop").is_enabled(), f"the stream ended before Stop was pressed (lengths {lengths}): make it longer"
    tab("stop").click()
    expect(tab("stats")).to_contain_text("stopped")
    assert len(tab("answer-text").text_content()) >= lengths[-1]  # what came stays
    wait_for(lambda: metric(server, "jaxserve:request_success_total", **labels, finished_reason="abort") > aborted,
             "the server to count the stopped request as aborted")
    wait_for(lambda: metric(server, "jaxserve:num_requests_running", engine="0", **labels) == 0, "the aborted request to stop running")
    assert metric(server, "jaxserve:request_success_total", **labels, finished_reason="length") == finished
    assert metric(server, "jaxserve:generation_tokens_total", **labels) - generated < long
    expect(tab("send")).to_be_enabled()
    expect(tab("stop")).to_be_disabled()

    # The other model answers the next question.
    tab("clear").click()
    expect(page.get_by_test_id("answer")).to_have_count(0)
    tab("model-picker").select_option("tiny-b")
    expect(tab("model-info")).to_have_text(f"version v2 · ready · {CONTEXT}-token context")
    tab("max-tokens").fill("40")
    tab("system-prompt").fill("You are a tiny random model.")
    tab.ask("Hello! Who are you?")
    expect(tab("answer-model")).to_have_text("tiny-b · v2")  # the answer's own `model` and version
    expect(tab("stats")).to_have_text(answered(40))
    assert metric(server, "jaxserve:routed_requests_total", **b) == routed + 1

    # Regenerate replaces the answer with a new one.
    tab("regenerate").click()
    expect(tab("stats")).to_have_text(answered(40))
    expect(page.get_by_test_id("answer")).to_have_count(1)
    expect(page.get_by_test_id("question")).to_have_count(1)
    assert metric(server, "jaxserve:routed_requests_total", **b) == routed + 2
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    print(f"playground screenshot: {SCREENSHOT}")

    # Every request went through the prefix: the page uses only URLs relative to itself.
    assert all(url.startswith(server.url + ROOT + "/") for url in tab.requests if url != server.url + ROOT), tab.requests

    # The key and the model are remembered.
    page.reload()
    expect(models).to_have_count(3)
    expect(tab("api-key")).to_have_value(KEY)
    expect(tab("model-picker")).to_have_value("tiny-b")
    expect(page.get_by_test_id("error")).to_have_count(0)
    assert tab.violations == [] and tab.errors == []
    tab.close()


def test_errors_read_as_messages_reasoning_folds_and_the_csp_holds(server, browser) -> None:
    tab = Tab(browser, width=420)  # a phone's width: the settings start folded
    page = tab.page
    page.goto(server.url + "/")  # the page without the prefix
    expect(tab("error")).to_contain_text("401")
    tab("api-key").fill("sk-wrong")
    tab("api-key").press("Tab")
    expect(tab("error")).to_contain_text("invalid API key")
    tab("api-key").fill(KEY)
    tab("api-key").press("Tab")
    expect(page.locator("#model option")).to_have_count(3)
    expect(page.get_by_test_id("error")).to_have_count(0)

    # A 400 from the server: max_tokens beyond the context.
    expect(tab("max-tokens")).to_be_hidden()
    page.locator("#settings summary").click()
    tab("max-tokens").fill("100000")
    tab.ask("Hi")
    expect(tab("error")).to_contain_text("Error 400 invalid_request_error")
    expect(tab("error")).to_contain_text(f"exceeds the context length {CONTEXT}")

    # A 429 and an error sent inside the stream, as a proxy or a failing engine would send them.
    chat = "**/v1/chat/completions"
    limited = json.dumps({"error": {"message": "rate limit reached", "type": "rate_limit_error", "code": "rate_limit_exceeded"}})
    page.route(chat, lambda route: route.fulfill(status=429, headers={"Retry-After": "3"}, content_type="application/json", body=limited))
    tab("regenerate").click()
    expect(tab("error")).to_have_text("Error 429 rate_limit_error: rate limit reached Retry in 3 s.")
    page.unroute(chat)
    frames = [{"model": "tiny-a", "choices": [{"index": 0, "delta": {"reasoning_content": "Thinking it over."}}]},
              {"model": "tiny-a", "choices": [{"index": 0, "delta": {"content": "Half an ans"}}]},
              {"error": {"message": "the engine failed", "type": "internal_server_error", "code": None}}]
    body = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
    page.route(chat, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    tab("regenerate").click()
    expect(tab("error")).to_have_text("Error internal_server_error: the engine failed")
    expect(tab("answer-text")).to_have_text("Half an ans")
    expect(tab("reasoning")).to_be_hidden()  # folded
    page.locator("details.reasoning summary").last.click()
    expect(tab("reasoning")).to_have_text("Thinking it over.")
    expect(page.get_by_test_id("answer")).to_have_count(1)
    page.unroute(chat)

    # A real answer after the errors.
    tab("max-tokens").fill("8")
    tab("regenerate").click()
    expect(tab("stats")).to_have_text(answered(8))
    assert tab.violations == [] and tab.errors == []

    # The watch sees a violation when there is one.
    page.evaluate("document.body.append(Object.assign(document.createElement('img'), {src: 'http://192.0.2.1/x.png'}))")
    wait_for(lambda: tab.violations, "the CSP watch to report a blocked image")
    tab.close()
