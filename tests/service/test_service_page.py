"""The page at `/`, in Debian's headless Chromium driven by Playwright, against the real service.

Two services: one over the checkpoint folder of a real (tiny) training run, with its metrics.jsonl;
and one with an API key over a folder that starts empty, into which the tests publish a model that
writes markup. Those keyed tests run in file order: the first needs the folder still empty.

`PAGE_SCREENSHOT=1` makes test_screenshot write the README's picture (docs/page.png); without it the
picture goes to a temporary folder, so that `make test` leaves the tree as it found it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import processes
import pytest
import torch
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from servicekit import API_KEY, publish, wait_for
from trainerkit import tiny_flags

from model import GPT, GPTConfig, Tokenizer, save_checkpoint
from model.checkpoint import atomic_write
from service import page as page_module

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "page.png"
CHROMIUM = "/usr/bin/chromium"
# Playwright's own browser download cannot work here: it drives Debian's Chromium, with no network
# chatter of its own (Playwright gives each launch a fresh temporary profile).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# A generation that is markup (13 distinct GPT-2 tokens, so one model can loop through them).
MARKUP = "<script><img src onerror=alert(1)>"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    """A real training run's folder: best_model.pt, last.pt, final_model.pt, metrics.jsonl. A context of
    1,024 tokens (untrained beyond the 32 it saw), so that generations can run long enough to stop."""
    out = tmp_path_factory.mktemp("run")
    flags = tiny_flags(cache_dir, out, "--steps", "30", "--eval-interval", "10", "--block-size", "1024",
                       "--lr", "1e-2", "--warmup-steps", "3")  # fmt: skip
    done = processes.run([sys.executable, "-m", "trainer", "fit", *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def service(launch_for_module, run_dir):
    return launch_for_module(run_dir, "--stream-interval", "0")


@pytest.fixture(scope="module")
def keyed(launch_for_module, tmp_path_factory):
    """A service with an API key over an empty folder (no checkpoint, no metrics.jsonl yet)."""
    return launch_for_module(tmp_path_factory.mktemp("keyed"), api_key=API_KEY)


@pytest.fixture(scope="module")
def browser():
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
    finally:
        playwright.stop()


class Tab:
    """A page in a fresh browser context (its own storage), with what it logged and fetched."""

    def __init__(self, browser: Browser, **context):
        self.context = browser.new_context(**context)
        self.page: Page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("dialog", lambda dialog: self.page_errors.append(f"a dialog opened: {dialog.message}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def open(self, url: str) -> Page:
        response = self.page.goto(url)
        assert response.status == 200
        return self.page

    def text(self, selector: str) -> str:
        return self.page.locator(selector).text_content()

    def wait_text(self, selector: str, expected: str) -> None:
        """Wait until the element's text contains `expected`."""
        wait_for(lambda: expected in self.text(selector), WAIT_MS / 1000, interval=0.1,
                 message=f"{selector} to show {expected!r} (shows {self.text(selector)!r})")  # fmt: skip

    def generate(self, prompt: str, **fields) -> None:
        self.page.fill("#prompt", prompt)
        for field, value in fields.items():
            self.page.fill(f"#{field}", str(value))
        self.page.click("#generate")

    def wait_finished(self) -> str:
        self.wait_text("#result", "finish_reason")
        return self.text("#result")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser):
    tabs: list[Tab] = []

    def open_tab(**context) -> Tab:
        tabs.append(Tab(browser, **{"viewport": {"width": 1280, "height": 900}, **context}))
        return tabs[-1]

    yield open_tab
    for each in tabs:
        each.close()
    # Whatever the test checked, the page's script never failed and never opened a dialog.
    assert [error for each in tabs for error in each.page_errors] == []


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / page_module.METRICS_FILE).read_text().splitlines()]


def served_step(service) -> int:
    [step] = {worker["step"] for worker in service.health().json()["workers"]}
    return step


def test_the_page_loads_from_the_service_alone_with_no_console_errors(service, tab):
    page_tab = tab()
    page = page_tab.open(service.url)
    page_tab.wait_text("#served-step", str(served_step(service)))
    page_tab.wait_text("#training", "records")
    assert page.title() == "gpt-service"
    assert page_tab.console_errors == []
    # The page, its style, script and icon, and its polls: nothing from anywhere else.
    assert page_tab.requests and all(url.startswith(service.url + "/") for url in page_tab.requests)
    paths = {url[len(service.url) :] for url in page_tab.requests}
    assert {"/", "/static/page.css", "/static/page.js", "/static/icon.svg", "/health", "/v1/training"} <= paths


def test_every_file_of_the_page_carries_a_strict_policy(service):
    for path, (_, media_type) in page_module.ASSETS.items():
        response = httpx.get(service.url + path)
        assert response.status_code == 200 and response.headers["content-type"] == media_type
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    html = httpx.get(service.url + "/").text
    # No inline script, style or event handler that the policy would have to allow.
    assert "<style" not in html and not re.search(r"<[^>]*\s(style|on\w+)\s*=", html)
    assert html.count("<script") == 1 and '<script src="/static/page.js" defer></script>' in html


def test_the_loss_chart_has_a_point_per_record_and_marks_the_served_step(service, run_dir, tab):
    page = tab().open(service.url)
    logged = records(run_dir)
    evaluated = [r for r in logged if "val_loss" in r]
    assert len(logged) == 30 and len(evaluated) == 3

    def points(selector: str) -> int:
        return page.locator(selector).evaluate("line => line.points.numberOfItems")

    wait_for(lambda: points("#chart polyline.train") == len(logged), WAIT_MS / 1000, message="the train curve")
    assert points("#chart polyline.val") == len(evaluated)
    assert page.locator("#chart circle.val-point").count() == len(evaluated)
    step = served_step(service)
    assert page.locator("#served-marker").get_attribute("data-step") == str(step)
    assert page.locator("#chart circle.served-point").count() == 1
    # The served checkpoint is the run's best evaluation: the marker sits on the validation curve.
    best = min(evaluated, key=lambda r: r["val_loss"])
    assert step == best["step"]
    assert page.locator("#served-loss").text_content() == f"{best['val_loss']:.4f}"


def test_generate_streams_growing_text_equal_to_a_plain_request_with_the_same_seed(service, tab):
    page_tab = tab()
    page = page_tab.open(service.url)
    page_tab.wait_text("#status", "Ready")
    # Every change of the completion, with whether the final event had been shown yet.
    page.evaluate("""() => {
        window.growth = [];
        const completion = document.getElementById("completion");
        new MutationObserver(() => window.growth.push({
            length: completion.textContent.length,
            final: document.getElementById("result").textContent !== "",
        })).observe(completion, {childList: true, characterData: true, subtree: true});
    }""")
    page_tab.generate("Once upon a time", max_new_tokens=300, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    result = page_tab.wait_finished()
    assert "finish_reason: length" in result and "300 completion tokens" in result

    growth = page.evaluate("() => window.growth")
    before_final = [g["length"] for g in growth if not g["final"]]
    assert len(set(before_final)) >= 5, growth
    assert before_final == sorted(before_final) and 0 < before_final[0] < before_final[-1]
    plain = service.predict(prompt="Once upon a time", max_new_tokens=300, temperature=0.9, top_k=40, top_p=0.95,
                            seed=1234)  # fmt: skip
    assert page_tab.text("#completion") == plain["text"]
    assert page_tab.text("#shown-prompt") == "Once upon a time"
    assert page_tab.console_errors == []


# A generation of 1,000 tokens takes the tiny model about three seconds, busy machine or not, while a busy
# browser can show its first token a second or two late: a try that ended before it was caught is made again.
STOP_TRIES = 5


def test_stop_ends_the_stream_and_the_service_frees_the_row(service, tab):
    page_tab = tab()
    page_tab.open(service.url)
    page_tab.wait_text("#status", "Ready")
    [worker] = service.metrics().pids("worker")
    for _ in range(STOP_TRIES):
        before = service.metrics()
        page_tab.generate("Stop me", max_new_tokens=1000)
        page_tab.page.wait_for_function("() => document.getElementById('completion').textContent", polling=20)
        # The worker is paused as soon as text shows, so that the generation cannot finish while Stop is pressed;
        # paused, its running gauge says whether the row is still in the batch.
        os.kill(worker, signal.SIGSTOP)
        try:
            caught = service.metrics().get("gpt_num_requests_running") == 1
            if caught:
                page_tab.page.click("#stop-button")
                page_tab.wait_text("#result", "stopped")
        finally:
            os.kill(worker, signal.SIGCONT)
        if caught:
            break
        page_tab.wait_finished()
    else:
        pytest.fail(f"each of {STOP_TRIES} generations ended before Stop could be pressed")
    shown = page_tab.text("#completion")

    def freed():
        scrape = service.metrics()
        return scrape.get("gpt_num_requests_running") == 0 and scrape

    after = wait_for(freed, 10, message="the row to be freed")
    aborted = ("gpt_requests_total", {"endpoint": "/predict", "status": "200", "finish_reason": "abort"})
    assert after.get(aborted[0], **aborted[1]) - before.get(aborted[0], **aborted[1]) == 1
    generated = after.get("gpt_generation_tokens_total") - before.get("gpt_generation_tokens_total")
    assert 0 < generated < 1000
    assert service.metrics().get("gpt_generation_tokens_total") == after.get("gpt_generation_tokens_total")
    assert page_tab.text("#completion") == shown and page_tab.page.is_enabled("#generate")
    assert page_tab.console_errors == []


def test_invalid_fields_are_shown_as_the_services_message(service, tab):
    page_tab = tab()
    page_tab.open(service.url)
    page_tab.generate("Too much", max_new_tokens=5000)
    page_tab.wait_text("#error", "422: max_new_tokens: must be at most 1024")
    assert page_tab.text("#completion") == "" and page_tab.text("#result") == ""
    page_tab.page.fill("#max_new_tokens", "8")
    page_tab.page.fill("#stop", "\\n\nzz")  # one stop string per line, \n for a newline
    page_tab.page.click("#generate")
    page_tab.wait_finished()
    assert page_tab.text("#error") == ""


def test_publishing_a_better_checkpoint_updates_the_served_step_without_a_reload(service, run_dir, tab):
    page_tab = tab()
    page = page_tab.open(service.url)
    step = served_step(service)
    page_tab.wait_text("#served-step", str(step))
    page.evaluate("() => { window.sameDocument = true; }")
    best = run_dir / "best_model.pt"
    original = best.read_bytes()
    try:
        publish(run_dir, step=step + 100, val_loss=1.5, seed=3)
        wait_for(lambda: page_tab.text("#served-step") == str(step + 100), WAIT_MS / 1000, interval=0.1,
                 message="the page to show the new step")  # fmt: skip
        assert page.evaluate("() => window.sameDocument") is True
        assert page_tab.text("#served-loss") == "1.5000"
        page_tab.wait_text("#served-marker", f"step {step + 100}")
        assert page_tab.text("#served-at").endswith("s ago")
    finally:
        atomic_write(best, original)  # the run's own checkpoint again, for the other tests
        service.wait_serving(step)


def test_the_page_fits_a_phone(service, tab):
    page_tab = tab(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)
    page = page_tab.open(service.url)
    page_tab.wait_text("#training", "records")
    assert page.evaluate("() => document.scrollingElement.scrollWidth") <= 390
    for selector in ("#prompt", "#generate", "#stop-button", "#output", "#chart", "#max_new_tokens", "#seed"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page_tab.generate("Small screen", max_new_tokens=20)
    assert "20 completion tokens" in page_tab.wait_finished()


def test_idle_page_costs_the_service_almost_no_cpu(service, tab):
    page_tab = tab()
    page = page_tab.open(service.url)
    page_tab.wait_text("#training", "records")
    service_processes = processes.tree(service.process.pid)
    polls = len(page_tab.requests)
    window = 7.0
    before = processes.cpu_seconds(service_processes)
    # A measurement window, not a synchronisation; Playwright's wait (not time.sleep) lets it see the polls.
    page.wait_for_timeout(window * 1000)
    used = processes.cpu_seconds(service_processes) - before
    print(f"service CPU with the page open and idle: {used / window:.2%} of a core")
    assert len(page_tab.requests) - polls >= 3  # it did poll: /health every 3 s, /v1/training every 5 s
    assert used < 0.05 * window, f"{used:.3f} s of CPU in {window} s with the page open"


def test_screenshot(service, tab, tmp_path):
    """The README's picture, from the real run: the chart, the served step and a generation."""
    page_tab = tab(viewport={"width": 1280, "height": 860})
    page = page_tab.open(service.url)
    page_tab.wait_text("#training", "records")
    page_tab.wait_text("#served-step", str(served_step(service)))
    page_tab.generate("The meaning of life is", max_new_tokens=40, temperature=0.8, seed=7)
    page_tab.wait_finished()
    target = SCREENSHOT if os.environ.get("PAGE_SCREENSHOT") else tmp_path / "page.png"
    target.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SCREENSHOT.exists() and "docs/page.png" in (ROOT / "README.md").read_text()


# The service with an API key: these run in file order, the first over the still empty folder.


def looping_model(text: str) -> GPT:
    """A GPT that, after any token of `text`, writes the next one, round and round: its first block's MLP
    maps each token's embedding to the next token's (the attention adds nothing, positions are zero), and the
    tied output layer makes that token's logit tower over every other."""
    cycle = Tokenizer().encode(text)
    model = GPT(GPTConfig.from_preset("tiny", block_size=1024))
    width, scale = model.config.n_embd, 4.0
    assert len(set(cycle)) == len(cycle) and 2 * len(cycle) <= width
    # Orthogonal directions of mean zero, which LayerNorm only rescales (to entries of ±4).
    directions = torch.zeros(len(cycle), width)
    for k in range(len(cycle)):
        directions[k, 2 * k], directions[k, 2 * k + 1] = 1.0, -1.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in [model.transformer.ln_f, *(n for b in model.transformer.h for n in (b.ln_1, b.ln_2))]:
            norm.weight.fill_(1.0)
        model.transformer.wte.weight[cycle] = scale * directions
        mlp = model.transformer.h[0].mlp
        # Hidden unit k fires (GELU(8 - 4) ≈ 4) for token k only, and turns its embedding into the next one's.
        mlp.c_fc.weight[: len(cycle)] = directions
        mlp.c_fc.bias[: len(cycle)] = -4.0
        mlp.c_proj.weight[:, : len(cycle)] = (scale * (directions.roll(-1, 0) - directions) / 4.0).T
    return model


def test_with_a_key_the_page_asks_for_it_once_and_works_with_it(keyed, tab):
    page_tab = tab()
    page = page_tab.open(keyed.url)
    page_tab.wait_text("#key-message", "needs its API key")
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    assert page.locator("#key-form").is_hidden()
    # No metrics.jsonl: an empty curve, not an error. No checkpoint: the service's own words.
    page_tab.wait_text("#training", "No training records yet")
    page_tab.wait_text("#chart", "no training records yet")
    page_tab.wait_text("#status", f"waiting for a checkpoint in {keyed.checkpoint_dir}")
    page_tab.generate("<", max_new_tokens=10)
    page_tab.wait_text("#error", f"503: waiting for a checkpoint in {keyed.checkpoint_dir}")
    assert "(retry in 5 s)" in page_tab.text("#error") and page_tab.text("#completion") == ""

    save_checkpoint(keyed.checkpoint_dir / "best_model.pt", looping_model(MARKUP), step=7, val_loss=0.5)
    page_tab.wait_text("#served-step", "7")
    page_tab.generate("<", max_new_tokens=40, temperature=1.0, seed="")
    page_tab.wait_finished()
    assert page_tab.text("#error") == ""
    # The same tab keeps the key across a reload; a new tab asks again.
    page.reload()
    page_tab.wait_text("#status", "Ready")
    page_tab.wait_text("#training", "No training records yet")
    assert page.locator("#key-form").is_hidden()
    another = tab()
    another.open(keyed.url)
    another.wait_text("#key-message", "needs its API key")


def test_a_generation_of_markup_is_shown_as_text(keyed, tab):
    page_tab = tab()
    page = page_tab.open(keyed.url)
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    page_tab.generate("<", max_new_tokens=26, temperature=1.0)
    page_tab.wait_finished()
    completion = page_tab.text("#completion")
    # Twice round the loop after the prompt's "<": the markup, character for character.
    assert completion == "script><img src onerror=alert(1)><" * 2
    assert completion == keyed.predict(prompt="<", max_new_tokens=26)["text"]
    assert MARKUP in page_tab.text("#output")
    # Text, not markup: no element was made, no handler ran (the tab fixture fails on any dialog).
    assert page.locator("#output script, #output img").count() == 0
    assert page.locator("#completion").evaluate("span => span.children.length") == 0


def test_a_wrong_key_gets_a_clear_message(keyed, tab):
    page_tab = tab()
    page = page_tab.open(keyed.url)
    page_tab.wait_text("#key-message", "needs its API key")
    page.fill("#key", "not-the-key")
    page.click("#key-form button")
    page_tab.wait_text("#key-message", "The service refused this key")
    assert page.locator("#key-form").is_visible()
    page_tab.generate("<", max_new_tokens=5)
    page_tab.wait_text("#error", "401: missing or wrong API key")
    assert page_tab.text("#completion") == ""


def test_make_up_prints_the_pages_address_first(up_module, capsys):
    up_module.banner(up_module.UpSettings(port=8123), children=[])
    first, *rest = capsys.readouterr().out.splitlines()
    assert first.startswith("[up] Page") and first.split()[2] == "http://127.0.0.1:8123/"
    assert any("http://127.0.0.1:8123" in line for line in rest)
