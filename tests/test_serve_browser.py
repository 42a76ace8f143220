"""iadkit serve, the page in a real browser: headless Chromium driven by Playwright.

The server runs on a free loopback port with a tiny PatchCore model. The test uploads images
through the page's file input, checks that every image and heat-map overlay has loaded, moves
the threshold slider and checks that the verdicts follow, saves the threshold on the server,
sorts the table, downloads the CSV, and takes a screenshot.

Chromium comes from the system (Debian: ``apt-get install chromium``; `.ci/run` installs it):
browser downloads are impossible here, so Playwright is pointed at that executable. The test
fails, with the install command, when Chromium or Playwright is missing; it skips only when
``IADKIT_SKIP_BROWSER=1`` says so. ``IADKIT_CHROMIUM`` overrides the executable's path and
``IADKIT_SERVE_SCREENSHOT`` names an extra copy of the screenshot.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest

from _serve_helpers import SIZE, copy_named, fit_tiny_patchcore, running_server
from iadkit.serve.app import create_app
from iadkit.serve.backend import load_predictor

CHROMIUM = os.environ.get("IADKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

if os.environ.get("IADKIT_SKIP_BROWSER") == "1":
    pytest.skip("IADKIT_SKIP_BROWSER=1: browser test skipped on request", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[test]' (or set IADKIT_SKIP_BROWSER=1)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium "
            "(or set IADKIT_CHROMIUM to its path, or IADKIT_SKIP_BROWSER=1 to skip)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(synthetic, tmp_path_factory):
    split = synthetic("metal", image_size=SIZE)
    folder = tmp_path_factory.mktemp("serve-browser")
    model_path = folder / "metal.iad"
    fit_tiny_patchcore(split).save(model_path)
    good = [s for s in split.test if s.label == 0][:3]
    bad = [s for s in split.test if s.label == 1][:3]
    images = copy_named(good, folder / "images", "good") + copy_named(bad, folder / "images", "bad")
    with running_server(create_app([load_predictor(model_path)])) as base_url:
        yield base_url, images


def verdicts(page) -> dict[str, str]:
    """File name -> verdict text, from the gallery cards."""
    return {
        card.locator("h3").inner_text(): card.locator(".verdict").inner_text().lower()
        for card in page.locator("#gallery .card").all()
    }


def test_page_in_chromium(browser, served, tmp_path):
    from playwright.sync_api import expect

    base_url, images = served
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page = context.new_page()
    outside, api_calls, page_errors = [], [], []

    def only_loopback(route):  # the page must need nothing beyond its own server
        url = route.request.url
        if url.startswith(base_url) or url.startswith("data:") or url.startswith("blob:"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("request", lambda r: api_calls.append((r.method, r.url)))
    page.on("pageerror", lambda e: page_errors.append(str(e)))

    page.goto(base_url + "/")
    expect(page.locator("#model option")).to_have_count(1)
    expect(page.locator("#model-info")).to_contain_text("patchcore")

    # upload: one file per request, two in flight; all six come back
    page.set_input_files("#files", [str(p) for p in images])
    cards = page.locator("#gallery .card")
    expect(cards).to_have_count(len(images))
    expect(page.locator("#progress")).to_have_text(f"{len(images)} file(s) processed")
    expect(page.locator("#results-table tbody tr")).to_have_count(len(images))
    assert sorted(verdicts(page)) == sorted(p.name for p in images)

    # every photo and every overlay decoded to a real bitmap of the model's input size
    sizes = page.evaluate(
        "() => [...document.querySelectorAll('#gallery img')].map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(sizes) == 2 * len(images)
    assert all(complete and w == SIZE and h == SIZE for _, complete, w, h in sizes), sizes
    assert sorted(c for c, *_ in sizes).count("overlay") == len(images)

    # verdicts shown = the server's rule at the model's threshold
    model = httpx.get(base_url + "/models/metal").json()
    scores = {c.locator("h3").inner_text(): float(c.get_attribute("data-score")) for c in cards.all()}
    assert verdicts(page) == {n: "anomalous" if s > model["threshold"] else "good" for n, s in scores.items()}

    # the slider re-judges live, without asking the server
    n_requests = len(api_calls)
    slider = page.locator("#threshold")
    slider.focus()
    page.keyboard.press("Home")  # below every score
    expect(page.locator("#summary")).to_have_text(
        f"{len(images)} of {len(images)} images flagged anomalous (not saved on the server)"
    )
    assert set(verdicts(page).values()) == {"anomalous"}
    page.keyboard.press("End")  # above every score
    expect(page.locator("#summary")).to_have_text(
        f"0 of {len(images)} images flagged anomalous (not saved on the server)"
    )
    assert set(verdicts(page).values()) == {"good"}
    ranked = sorted(scores.values())
    middle = (ranked[2] + ranked[3]) / 2
    page.fill("#threshold-value", repr(middle))
    page.locator("#threshold-value").press("Enter")
    expect(page.locator("#summary")).to_contain_text(f"3 of {len(images)} images flagged anomalous")
    assert verdicts(page) == {n: "anomalous" if s > middle else "good" for n, s in scores.items()}
    assert len(api_calls) == n_requests, api_calls[n_requests:]
    assert httpx.get(base_url + "/models/metal").json()["threshold"] == model["threshold"]  # server unchanged

    # ... until the button stores it
    page.click("#save-threshold")
    expect(page.locator("#threshold-status")).to_contain_text("saved")
    stored = httpx.get(base_url + "/models/metal").json()
    assert stored["threshold"] == pytest.approx(middle, rel=1e-12) and stored["threshold_rule"] == "manual"
    expect(page.locator("#summary")).to_have_text(f"3 of {len(images)} images flagged anomalous")

    # the opacity slider fades the heat map out
    first = cards.first
    first.locator(".opacity input").focus()
    page.keyboard.press("Home")
    assert first.locator("img.overlay").evaluate("i => getComputedStyle(i).opacity") == "0"

    # sortable table: by score (highest first on the first click), then reversed
    page.click("#results-table th[data-key=score] button")
    rows = [
        float(v) for v in page.locator("#results-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.score)")
    ]
    assert rows == sorted(rows, reverse=True)
    page.click("#results-table th[data-key=score] button")
    rows = [
        float(v) for v in page.locator("#results-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.score)")
    ]
    assert rows == sorted(rows)
    page.click("#results-table th[data-key=filename] button")
    names = page.locator("#results-table tbody tr td:nth-child(2)").all_inner_texts()
    assert names == sorted(names)

    # CSV download: one row per image, verdicts at the page's threshold
    with page.expect_download() as info:
        page.click("#download-csv")
    download = info.value
    assert download.suggested_filename == "iadkit-metal-results.csv"
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert {r["filename"]: r["verdict"] for r in rows} == verdicts(page)
    assert {r["filename"]: float(r["score"]) for r in rows} == scores
    assert {float(r["threshold"]) for r in rows} == {middle}

    # a bad file among good ones: its own error line, the others still scored
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:200])
    page.click("#clear")
    page.set_input_files("#files", [str(broken), str(images[1])])
    expect(cards).to_have_count(1)
    expect(page.locator("#errors li")).to_have_count(1)
    expect(page.locator("#errors li")).to_contain_text("broken.png: ")
    expect(page.locator("#errors li")).to_contain_text("truncated")

    # final picture for the record: all six again, at the saved threshold
    page.click("#clear")
    page.set_input_files("#files", [str(p) for p in images])
    expect(cards).to_have_count(len(images))
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("IADKIT_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["IADKIT_SERVE_SCREENSHOT"])

    assert outside == [], f"the page tried to reach beyond its server: {outside}"
    assert page_errors == []
    context.close()
