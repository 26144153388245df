"""``unguide serve``: the studio behind the page, the page in a real browser (Debian's chromium through Playwright's
Python client), what the server refuses, and 20 requests at once.

The browser test needs /usr/bin/chromium (`.ci/run` installs it); without it the browser test is skipped, unless
UNGUIDE_REQUIRE_BROWSER=1 (set by `.ci/run`) makes that a failure. UNGUIDE_SCREENSHOT names where the screenshot
goes (default: the test's temp folder; docs/serve.png was taken with it) and UNGUIDE_SERVE_RUNS serves a runs folder
of your own instead of the quick run made here.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from unguide.errors import UnguideError

gradio = pytest.importorskip("gradio", reason="the serve extra (make test installs it)")

from unguide.serve.catalog import RunCatalog  # noqa: E402
from unguide.serve.studio import ServeLimits, Studio, parse_prompts, check_numbers  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
QUICK = "sun/quick"
PROMPT = "a photo of the sun"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder holding one quickly erased toy run (selective recipe, image gate calibrated on a few steps)."""
    if os.environ.get("UNGUIDE_SERVE_RUNS"):
        return Path(os.environ["UNGUIDE_SERVE_RUNS"])
    from unguide.erasure.concepts import load_preset
    from unguide.erasure.training import EraseConfig, erase
    from unguide.models.loading import load_model

    root = tmp_path_factory.mktemp("runs")
    spec = load_preset("sun")
    erase(load_model("toyworld"), spec, root / QUICK,
          EraseConfig.for_concept("selective", spec, iterations=4, calibration_steps=4,
                                  calibration_samples=2), progress=False)
    return root


def run_name(root: Path) -> str:
    return QUICK if (root / QUICK).is_dir() else RunCatalog(root).names()[0]


# ------------------------------------------------------------------------------------------------- the studio
def test_catalog_offers_runs_by_name_and_refuses_everything_else(runs, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(runs / QUICK, root / "sun" / "selective")
    (root / "sun" / "unfinished").mkdir()
    (root / "sun" / "unfinished" / "erasure.json").write_text('{"status": "training"}')
    os.symlink(runs, root / "linked")  # a link inside the runs folder must not lead anywhere
    catalog = RunCatalog(root)
    assert catalog.names() == ["sun/selective"]
    assert catalog.get("sun/selective").concept == "sun"
    for bad in ("../etc", "../../etc/passwd", "/etc/passwd", str(root / "sun" / "selective"), "sun/../sun/selective",
                "linked/sun/quick", "", None):
        with pytest.raises(UnguideError, match="unknown run|no erasure run chosen"):
            catalog.get(bad)
    with pytest.raises(UnguideError, match="leaves the runs directory"):
        catalog.new_run_path("../outside")


@pytest.mark.parametrize("text, n, fragment", [
    ("", 1, "no prompt"),
    ("  \n \n", 1, "no prompt"),
    ("x" * 301, 1, "301 characters long"),
    ("\n".join(["a photo of the sun"] * 9), 1, "at most 8 per request"),
    ("a\nb\nc\nd\ne", 4, "20 images: at most 16"),
    ("a photo of the sun", 5, "images per prompt must be 1 to 4"),
    ("a photo of the sun", 1.5, "whole number"),
])
def test_bad_requests_are_refused_with_one_clear_message(text, n, fragment):
    limits = ServeLimits()
    with pytest.raises(UnguideError, match=fragment):
        prompts = parse_prompts(text, limits)
        check_numbers(n, 0, 50, limits, len(prompts))


def test_a_comparison_draws_the_same_seeds_three_ways_and_downloads_with_its_settings(runs, toy_bundle, tmp_path):
    from PIL import Image

    from unguide.generation.pipeline import UnGuidePipeline
    from unguide.generation.folders import read_png_metadata

    pipe = UnGuidePipeline.from_bundle(toy_bundle)
    studio = Studio(pipe, RunCatalog(runs), tmp_path / "out")
    c = studio.compare(run_name(runs), "a photo of the sun\na photo of the boat", n=2, seed=3, steps=8)
    assert [r.prompt for r in c.rows] == ["a photo of the sun", "a photo of the boat"]
    assert all(r.seeds == [3, 4] for r in c.rows)
    pixels = {v: np.stack([np.asarray(Image.open(p)) for r in c.rows for p in r.images[v]]).astype(float)
              for v in ("base", "adapter", "unguidance")}
    pipe.unload_erasure()
    plain = pipe(["a photo of the sun", "a photo of the boat"], num_images_per_prompt=2, seed=3,
                 num_inference_steps=8, output_type="np", progress=False).images
    assert np.abs(pixels["base"] - np.round(plain * 255)).max() <= 1  # the base view is the base model's image
    assert np.abs(pixels["adapter"] - pixels["base"]).mean() > 0.1  # a 4-iteration adapter: small, but not nothing
    flags = [s["image_flagged"] for r in c.rows for s in r.scores]
    assert len(flags) == 4
    for k, fired in enumerate(flags):  # UnGuidance keeps the base image unless the image gate fired on it
        same = np.array_equal(pixels["unguidance"][k], pixels["base"][k])
        assert same != fired, (k, fired)
    zipped = zipfile.ZipFile(studio.archive(c))
    names = zipped.namelist()
    assert sum(n.endswith(".png") for n in names) == 12 + 3  # 2 prompts x 2 seeds x 3 views, plus a grid per view
    settings = json.loads(zipped.read(f"{c.request}/settings.json"))
    assert settings["seed"] == 3 and settings["steps"] == 8 and settings["run"] == run_name(runs)
    assert read_png_metadata(c.rows[0].images["unguidance"][0])["seed"] == 3


@pytest.mark.slow
def test_erasing_a_preset_from_the_studio_adds_a_run_the_page_can_pick(runs, toy_bundle, tmp_path):
    from unguide.generation.pipeline import UnGuidePipeline

    studio = Studio(UnGuidePipeline.from_bundle(toy_bundle), RunCatalog(tmp_path / "runs"), tmp_path / "out")
    assert studio.run_names() == []
    assert "moon" in studio.presets() and "sd-cat" not in studio.presets()  # the loaded model's presets only
    with pytest.raises(UnguideError, match="unknown preset '../sun'"):
        studio.erase("../sun")
    with pytest.raises(UnguideError, match="iterations must be a whole number"):
        studio.erase("moon", "reference", "many")
    name = studio.erase("moon", "reference", 2, calibration_steps=2)
    assert name == "moon/reference-2" and studio.run_names() == [name]
    assert studio.describe(name)["concept"] == "moon" and studio.describe(name)["gate"] == "empty"
    assert studio.pipe.adapter is None  # training leaves the base model as it was


def test_serve_without_gradio_says_how_to_get_it(monkeypatch, capsys):
    from unguide.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["serve", "--runs", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'unguide[serve]'" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(line.split()[1]) / 1024 for line in status.splitlines() for k in ("VmRSS", "VmHWM")
            if line.startswith(k + ":")}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    port, out = free_port(), tmp_path_factory.mktemp("serve")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(out / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "unguide.cli", "serve", "--runs", str(runs), "--port", str(port),
                             "--out", str(out / "requests")], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("unguide serve did not come up:\n" + (out / "server.log").read_text())
            time.sleep(0.5)
    yield {"url": url, "port": port, "pid": proc.pid, "log": out / "server.log"}
    proc.terminate()
    proc.wait(timeout=30)


def chromium_or_skip():
    if not Path(CHROMIUM).exists():
        if os.environ.get("UNGUIDE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


@pytest.mark.slow
def test_the_page_in_a_real_browser(server, runs, tmp_path):
    sync_api = chromium_or_skip()
    shot = Path(os.environ.get("UNGUIDE_SCREENSHOT", tmp_path / "serve.png"))
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: problems.append(f"outside request: {r.url}")
                if not r.url.startswith((server["url"], "data:", "blob:")) else None)
        page.goto(server["url"] + "/")
        page.locator("#run-info").get_by_text("concept").wait_for(timeout=30_000)
        assert run_name(runs) in page.locator("#run-info").inner_text()

        # bad input first: an empty request says so on the page
        page.locator("#generate").click()
        page.locator("#status").get_by_text("no prompt").wait_for(timeout=30_000)

        page.locator("#prompts textarea").fill(f"{PROMPT}\na photo of the boat")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Drew 2 prompt(s)").wait_for(timeout=120_000)
        rows = page.locator("#results tr[data-prompt-index]")
        assert rows.count() == 2
        for i in range(2):
            row = rows.nth(i)
            for view in ("base", "adapter", "unguidance"):
                img = row.locator(f"img[data-view='{view}']")
                assert img.count() == 1
                assert img.evaluate("el => el.complete && el.naturalWidth > 0")  # decoded, not a broken image
            decision = row.locator(".decision")
            assert decision.get_attribute("data-decision") in ("image-fired", "image-kept")
            assert "image gate" in decision.inner_text() and "scores below" in decision.inner_text()
        assert page.locator("#download").get_by_text(".zip").count() >= 1

        # too many images for one request: the limit is named on the page, the last results stay
        page.locator("#prompts textarea").fill("\n".join(f"a photo of the {w}" for w in
                                                         ("sun", "moon", "boat", "tree", "fish")))
        page.locator("#n input[type='number']").fill("4")
        page.locator("#n input[type='number']").press("Enter")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("at most 16 per request").wait_for(timeout=30_000)
        page.locator("#n input[type='number']").fill("1")
        page.locator("#n input[type='number']").press("Enter")
        page.locator("#prompts textarea").fill(f"{PROMPT}\na photo of the boat")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Drew 2 prompt(s)").wait_for(timeout=120_000)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not problems, problems
    assert shot.stat().st_size > 10_000


def test_the_server_listens_on_loopback_only(server):
    """/proc/net/tcp lists the listening socket of the port: its address must be 127.0.0.1."""
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) == server["port"]:
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex; no 0.0.0.0, no IPv6 wildcard


@pytest.mark.parametrize("path", ["/gradio_api/file=/etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd",
                                  "/gradio_api/file=../../../../../../etc/passwd", "/file=/etc/passwd",
                                  "/gradio_api/file=/proc/self/environ", "/static/../../../../etc/passwd",
                                  "/gradio_api/file=" + __file__])
def test_file_routes_refuse_files_outside_the_apps_outputs(server, path):
    try:
        with urllib.request.urlopen(server["url"] + path, timeout=10) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    assert status in (403, 404), (status, body[:200])
    assert b"root:" not in body and b"HF_HUB_OFFLINE" not in body and b"def test_" not in body


def client(server):
    from gradio_client import Client

    return Client(server["url"] + "/", verbose=False, download_files=False)


def test_a_run_name_with_dot_dot_is_refused_and_prompts_are_escaped(server, runs):
    api = client(server)
    status, html_out, zip_file = api.predict("../../etc/passwd", PROMPT, 1, 0, 5, "run's own", api_name="/compare")
    assert "unknown run '../../etc/passwd'" in status and html_out == "" and zip_file is None
    status, html_out, _ = api.predict(run_name(runs), "<script>alert(1)</script> sun", 1, 0, 5, "run's own",
                                      api_name="/compare")
    assert "Drew 1 prompt" in status
    assert "<script>" not in html_out and "&lt;script&gt;" in html_out


def test_the_neighbours_button_draws_the_concepts_synonyms_and_neighbours(server, runs):
    status, html_out, zip_file = client(server).predict(run_name(runs), 0, 5, "run's own", api_name="/neighbours")
    rows = html_out.count("<tr data-prompt-index")
    assert rows >= 6 and f"Drew {rows} prompt" in status and "gate run's own" in status and zip_file
    for kind in ("target", "synonym", "unseen synonym", "neighbour"):
        assert f"<div class='small'>{kind}</div>" in html_out
    assert html_out.count("<img") == 3 * rows


@pytest.mark.slow
def test_twenty_requests_at_once_are_queued_and_all_answered(server, runs):
    api, name = client(server), run_name(runs)
    api.predict(name, PROMPT, 1, 0, 5, "run's own", api_name="/compare")  # warm: the model and run are loaded
    before = rss_mb(server["pid"])
    peak, done = [before["VmRSS"]], threading.Event()

    def watch():
        while not done.wait(0.2):
            peak.append(rss_mb(server["pid"])["VmRSS"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.time()
    with ThreadPoolExecutor(20) as pool:  # 20 clients, each its own connection and session
        answers = list(pool.map(lambda i: client(server).predict(name, f"a photo of the sun number {i}", 1, i, 5,
                                                                "run's own", api_name="/compare"), range(20)))
    seconds = time.time() - t0
    done.set()
    watcher.join()
    after = rss_mb(server["pid"])
    statuses = [a[0] for a in answers]
    assert all("Drew 1 prompt" in s for s in statuses), statuses
    for i, (_, html_out, _) in enumerate(answers):
        assert f"number {i}</b>" in html_out and html_out.count("<img") == 3  # each answer is its own request's
    growth = max(peak) - before["VmRSS"]
    print(f"\n20 parallel requests: {seconds:.1f} s; server RSS {before['VmRSS']:.0f} MB before, peak "
          f"{max(peak):.0f} MB, {after['VmRSS']:.0f} MB after (growth {growth:.0f} MB)")
    assert growth < 500, f"server memory grew {growth:.0f} MB under 20 requests"
