"""`multiar serve`'s page (GET /): served from the package, nothing that reaches another origin, JS
that parses; image prompts as bytes; and (marked `browser`) the page in headless Chromium from Debian's
packages: a key asked once, each domain generated, notes drawn and an audio element with a duration, a
FASTA that Bio.SeqIO parses, a request cancelled with Stop (its slot freed), no JS errors, and one
screenshot per domain in outputs/page/page_<domain>.png (benchmarks/page_<domain>.png are copies)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import serve_on_loopback
from fastapi.testclient import TestClient

from multiar.commands.serve_app import AppState, create_app
from multiar.commands.serve_requests import RequestError, file_prompt

ROOT = Path(__file__).parents[2]
STATIC = ROOT / "multiar" / "commands" / "static"
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# the one absolute URL the page may name: SVG's namespace (a name, never fetched)
EXTERNAL = re.compile(
    r"(?i:(https?:)?//(?!www\.w3\.org/2000/svg\")[a-z0-9.-]+\.[a-z]{2,})|@import|@font-face|(?<![\w.])url\("
)


def test_page_and_its_files_are_served_with_a_self_only_policy(monkeypatch):
    client = TestClient(create_app(AppState({}, api_key="k")))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/v1/models").status_code == 401  # the API needs the key, the page does not
    names = set(re.findall(r"/static/([\w.]+)", page.text))
    for js in STATIC.glob("*.js"):
        names |= set(re.findall(r'"/static/([\w.]+)"', js.read_text()))
    assert names == {p.name for p in STATIC.iterdir() if p.name != "index.html"}
    for name in names:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.content == (STATIC / name).read_bytes()
    for bad in ("nope.js", "..%2Fserve.py", "index.html.bak"):
        assert client.get(f"/static/{bad}").status_code == 404


def test_static_files_name_no_other_origin():
    for path in STATIC.iterdir():
        hits = EXTERNAL.findall(path.read_text())
        assert not hits, (path.name, hits)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the JS syntax check)")
def test_page_js_parses(tmp_path):
    for path in STATIC.glob("*.js"):
        module = tmp_path / f"{path.stem}.mjs"
        module.write_text(path.read_text())
        done = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (path.name, done.stderr)


def png_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (8, 8), 128).save(out, format="PNG")
    return out.getvalue()


def test_image_prompts_are_bytes_never_paths(tmp_path):
    image, protein = SimpleNamespace(name="image"), SimpleNamespace(name="protein")
    keys: dict = {}
    file_prompt(image, {"prompt_image": base64.b64encode(png_bytes()).decode()}, keys, tmp_path, 1 << 20)
    assert (
        keys["prompt"] == str(tmp_path / "prompt.png")
        and (tmp_path / "prompt.png").read_bytes() == png_bytes()
    )
    for domain, body, keys in (
        (image, {}, {"prompt": "/etc/passwd"}),
        (image, {"prompt_image": base64.b64encode(b"not an image").decode()}, {}),
        (image, {"prompt_image": "%%%"}, {}),
        (protein, {"prompt_image": "AAAA"}, {}),
        (image, {"prompt_midi": "AAAA"}, {}),
    ):
        with pytest.raises(RequestError):
            file_prompt(domain, body, dict(keys), tmp_path, 1 << 20)


# ---- the page in a real browser ----------------------------------------------------------------------


def browser_missing() -> str | None:
    if not (CHROMIUM.exists() and DRIVER.exists()):
        return f"{CHROMIUM} and {DRIVER} are not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run per domain (two training steps each: the page needs samples, not good ones)."""
    from conftest import TINY, bundled_files, proteome_subset

    from multiar.config import load_config
    from multiar.training.run import train

    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("page_runs")
    midi = tmp / "midi" / "chorales"
    midi.mkdir(parents=True)
    for f in bundled_files("music", 12):
        (midi / f.name).write_bytes(f.read_bytes())
    data = proteome_subset(tmp / "fasta", per_file=20)
    extra = {
        "music": [
            "domain=music",
            f"data.paths=[{tmp / 'midi'}]",
            "data.val_fraction=0.2",
            "model.block_size=128",
        ],
        "protein": ["domain=protein", f"data.paths=[{data}]", "data.tags=header:OX"],
        "code": ["domain=code", "data.max_documents=20", "domain.settings.fim_rate=0.5"],
        "image": ["domain=image", "data.tags=header:label", "data.max_documents=300"],
    }
    for name, overrides in extra.items():
        steps = ["trainer.max_steps=2", "trainer.val_check_interval=2"]
        train(load_config("train", [*TINY, *overrides, *steps, f"run_dir={tmp / name}"]))
    return [tmp / name for name in extra]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    from multiar.commands.serve import build_state
    from multiar.config import load_config

    files = tmp_path_factory.mktemp("page_files")
    mp = pytest.MonkeyPatch()
    mp.setenv("MULTIAR_API_KEY", "page-key")
    cfg = load_config(
        "serve",
        [
            f"runs=[{','.join(map(str, runs))}]",
            "dtype=fp32",
            "attention=sdpa",  # as test_serve_http's servers
            "step=eager",
            "slots=4",
            f"files_dir={files}",
            "max_tokens=20000",
        ],
    )
    state, app = build_state(cfg)
    mp.undo()
    url, uv, thread = serve_on_loopback(app)
    yield SimpleNamespace(url=url, state=state, files=files)
    uv.should_exit = True
    thread.join(10)
    for s in state.models.values():
        s.engine.stop()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--disable-gpu", "--window-size=1280,1100", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait(driver, condition, seconds=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def pick(driver, model: str):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "model")).select_by_value(model)
    section = driver.find_element("id", model)
    wait(driver, lambda d: section.is_displayed())
    return section


def fill(section, **values):
    for name, value in values.items():
        field = section.find_element("name", name)
        field.clear()
        field.send_keys(str(value))


def generate(driver, section, states=("done",)):
    driver.execute_script("arguments[0].dataset.state = 'clicked'", section)
    section.find_element("css selector", "button.go").click()
    wait(driver, lambda d: section.get_attribute("data-state") not in ("clicked", "running"))
    assert section.get_attribute("data-state") in states, section.find_element("css selector", ".note").text


def screenshot(driver, section, domain):
    driver.execute_script("arguments[0].scrollIntoView()", section)
    # outputs/ (ignored by git): a test run never rewrites the tracked screenshots in benchmarks/,
    # which were taken from it once (copy them over to refresh)
    path = ROOT / "outputs" / "page" / f"page_{domain}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


@pytest.mark.browser
def test_the_page_in_headless_chromium(server, browser, tmp_path):
    from Bio import SeqIO
    from conftest import bundled_files

    driver = browser
    driver.get(server.url)
    # the key is asked once, then every call carries it
    wait(driver, lambda d: d.find_element("id", "key-dialog").is_displayed(), 20)
    driver.find_element("id", "key-input").send_keys("page-key")
    driver.find_element("css selector", "#key-form button").click()
    wait(driver, lambda d: len(d.find_elements("css selector", "#model option")) == 4, 20)

    music = pick(driver, "music")
    music.find_element("name", "prompt_midi").send_keys(str(bundled_files("music", 1)[0]))  # a MIDI prompt
    fill(music, prompt_bars=1, max_new_tokens=48, seed=2)
    generate(driver, music)
    assert len(music.find_elements("css selector", "svg.roll rect.note")) > 0
    audio = music.find_element("tag name", "audio")
    wait(driver, lambda d: (d.execute_script("return arguments[0].duration", audio) or 0) > 0, 30)
    links = [a.text for a in music.find_elements("css selector", ".links a")]
    assert "sample_000.mid" in links
    screenshot(driver, music, "music")

    protein = pick(driver, "protein")
    fill(protein, tags="OX=83333", n=3, max_new_tokens=40, min_len=10)
    generate(driver, protein)
    assert len(protein.find_elements("css selector", "tbody tr")) == 3
    assert protein.find_elements("css selector", "td.seq span.aa-h")
    protein.find_element("link text", "samples.fasta").click()
    fasta = driver.downloads / "samples.fasta"
    wait(driver, lambda d: fasta.exists() and fasta.stat().st_size > 0, 20)
    records = list(SeqIO.parse(fasta, "fasta"))
    assert len(records) == 3 and all(len(r.seq) >= 10 for r in records)
    screenshot(driver, protein, "protein")

    code = pick(driver, "code")
    fill(code, prefix="def add(a, b):", suffix="print(add(1, 2))", max_new_tokens=24)
    generate(driver, code)
    text = code.find_element("css selector", "pre.code").text
    assert text.startswith("def add(a, b):") and text.rstrip().endswith("print(add(1, 2))")
    assert code.find_elements("css selector", "pre.code span.tok-kw")
    screenshot(driver, code, "code")
    fill(code, prefix="def add(a, b):\n    return", max_new_tokens=24)
    code.find_element("name", "suffix").clear()
    generate(driver, code)  # a prompt, stop_at=block
    assert code.find_element("css selector", "pre.code").text.startswith("def add(a, b):\n    return")

    image = pick(driver, "image")
    fill(image, tags="label=7", n=8)
    generate(driver, image)
    shown = "return [...arguments[0].querySelectorAll('.grid img')].filter(i => i.naturalWidth > 0).length"
    wait(driver, lambda d: d.execute_script(shown, image) == 8, 20)
    prompt = next(server.files.glob("image/*/sample_000.png"))
    image.find_element("name", "prompt_image").send_keys(str(prompt))
    fill(image, prompt_rows=4, n=4)
    generate(driver, image)
    wait(driver, lambda d: d.execute_script(shown, image) == 4, 20)
    screenshot(driver, image, "image")

    # Stop: the server cancels (its slot is freed) and the page keeps the notes made so far
    engine = server.state.models["music"].engine
    music = pick(driver, "music")
    driver.execute_script("arguments[0].value = ''", music.find_element("name", "prompt_midi"))
    fill(music, max_new_tokens=20000, min_new_tokens=20000)
    music.find_element("css selector", "button.go").click()
    wait(driver, lambda d: len(music.find_elements("css selector", "svg.roll rect.note")) >= 3, 60)
    assert engine.busy == 1
    music.find_element("css selector", "button.stop").click()
    wait(driver, lambda d: music.get_attribute("data-state") == "stopped", 20)
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.busy == 0
    assert music.find_elements("css selector", "svg.roll rect.note")
    assert music.find_element("partial link text", "stopped.mid")
    # this page's synth plays the notes kept (the server rendered no WAV for a cancelled request)
    wait(driver, lambda d: audio.get_attribute("data-source") == "page", 30)
    wait(driver, lambda d: (d.execute_script("return arguments[0].duration", audio) or 0) > 0, 30)

    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "status of 401" not in e["message"]
    ]
    assert not errors, errors
