"""The course's website (make site, tools/build_site.py), built once per session and read in a real browser.

Headless Chromium (Debian's chromium and chromium-driver, driven through Selenium) opens every page served
from localhost and checks: no console error, no request to another host, every image loaded, every link
inside the site leads to a file (and to its anchor), math typeset by MathJax. Screenshots of the front
page and of notebook 03 go to build/site-screenshots/ for review. Without the browser the browser tests
skip, saying how to install it (make system-deps); in CI (CI set) they fail instead.

EFFML_SITE_DIR=<folder of HTML> checks an already built site instead of building one.
"""

import functools
import html
import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "site-screenshots"
INSTALL = ("install it with `make system-deps` (Debian/Ubuntu: apt-get install chromium chromium-driver, "
           "as root or through sudo)")
pytestmark = pytest.mark.timeout(600)


def missing(what: str):
    """Skip, saying how to get ``what``; in CI, fail: CI installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must have it: make system-deps and make venv install it)")
    pytest.skip(what)


# ------------------------------------------------------------------------------------------------ the site


@pytest.fixture(scope="session")
def site() -> Path:
    """The built site's HTML folder: built here, once per session (incremental: build/site keeps Sphinx's
    state, so a build with nothing changed takes seconds)."""
    if os.environ.get("EFFML_SITE_DIR"):
        return Path(os.environ["EFFML_SITE_DIR"]).resolve()
    for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
        try:
            __import__(module)
        except ImportError:
            missing(f"the site's build needs {module}, in the dev extra: pip install -e '.[dev]' (make venv)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
    build_site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_site)
    t0 = time.perf_counter()
    out = build_site.build(ROOT / "build" / "site")
    print(f"site built in {time.perf_counter() - t0:.1f} s")
    return out


def pages(site: Path) -> list[str]:
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if not p.relative_to(site).as_posix().startswith("_"))


def text_of(path: Path) -> str:
    """A page's text without its tags (highlighted code comes back as it was written)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_every_part_of_the_course_has_its_page(site):
    have = set(pages(site))
    want = {"index.html", "labs/index.html", "grading/README.html", "docs/API.html", "bench/index.html"}
    want |= {f"notebooks/{p.stem}.html" for p in (ROOT / "notebooks").glob("*.ipynb")}
    want |= {p.relative_to(ROOT).with_suffix(".html").as_posix() for p in (ROOT / "labs").glob("lab*/lab*.ipynb")}
    want |= {f"bench/{d.name}.html" for d in (ROOT / "bench" / "results").iterdir() if any(d.glob("*.json"))}
    assert want <= have, f"pages missing from the site: {sorted(want - have)}"
    front = (site / "index.html").read_text()
    for nb in (ROOT / "notebooks").glob("0[1-9]_*.ipynb"):  # the course map links every module's notebook
        assert f'href="notebooks/{nb.stem}.html"' in front, f"the front page does not link {nb.name}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_a_notebook_page_shows_its_committed_outputs(site, name):
    """Every figure and table the committed notebook holds is on its page (the site never runs a cell)."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    widget_models = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    held = [o for m in widget_models.values() for o in m.get("state", {}).get("outputs", []) if isinstance(o, dict)]
    n_png = sum("image/png" in o.get("data", {}) for o in outs + held)  # cells' figures and widgets' (fallbacks)
    n_md = sum(len(re.findall(r"!\[|<img ", "".join(c["source"]))) for c in nb["cells"] if c["cell_type"] == "markdown")
    n_tables = sum("<table" in "".join(o.get("data", {}).get("text/html", "")) for o in outs)
    page = (site / "notebooks" / f"{name}.html").read_text()
    n_img = len(re.findall(r'<img [^>]*src="\.\./_images/', page))
    assert n_img == n_png + n_md, f"the page shows {n_img} figures, the notebook has {n_png} (+{n_md} in its text)"
    assert page.count("<table") >= n_tables, "a table of the notebook is missing"
    if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs):
        assert 'class="effml-widget-fallback"' in page, "a widget has no static fallback"
        assert "interactive(children=" not in page, "a widget shows its repr instead of its static fallback"


def _protected_lines(name: str) -> list[str]:
    """The distinctive lines of a lab's solutions and hidden tests (in its nbgrader source)."""
    nb = json.loads((ROOT / "solutions" / name / f"{name}.ipynb").read_text())
    release = (ROOT / "labs" / name / f"{name}.ipynb").read_text()
    lines = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        for begin, end in (("### BEGIN SOLUTION", "### END SOLUTION"), ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")):
            for block in re.findall(re.escape(begin) + r"(.*?)" + re.escape(end), src, re.S):
                lines += [ln.strip() for ln in block.splitlines() if len(ln.strip()) >= 24 and json.dumps(ln.strip())[1:-1] not in release]
    return lines


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "labs").glob("lab*")))
def test_a_lab_page_is_the_release_without_solutions_or_hidden_tests(site, name):
    page = site / "labs" / name / f"{name}.html"
    text = text_of(page)
    for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS"):
        assert marker not in text
    leaked = [ln for ln in _protected_lines(name) if ln in text]
    assert not leaked, f"{page.name} shows lines of the solutions or hidden tests: {leaked[:3]}"
    assert "NotImplementedError" in text or "YOUR CODE HERE" in text, "the lab page has no stubs to fill in"


# --------------------------------------------------------------------------------------------- the browser


class _Handler(SimpleHTTPRequestHandler):
    log: list  # (path, status) of every request the server answered

    def log_request(self, code="-", size="-"):
        self.log.append((self.path, int(code) if str(code).isdigit() else code))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server(site):
    """The site served on an ephemeral localhost port, as any static host would serve it."""
    handler = type("Handler", (_Handler,), {"log": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", handler.log
    httpd.shutdown()
    httpd.server_close()


def _find(*names):
    for name in names:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the browser tests drive Chromium through selenium, in the dev extra: pip install -e '.[dev]'")
    # CHROMIUM / CHROMEDRIVER name other binaries (a pair of the same version)
    chromium = _find(*([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else ["chromium", "chromium-browser"]))
    driver_path = _find(*([os.environ["CHROMEDRIVER"]] if os.environ.get("CHROMEDRIVER")
                          else ["chromedriver", "/usr/lib/chromium/chromedriver"]))
    if not chromium or not driver_path:
        missing(f"the site's browser tests need Chromium and its driver ({'chromium' if not chromium else 'chromedriver'} "
                f"not found): {INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="effml-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-quic", "--window-size=1280,1000", "--hide-scrollbars",
                f"--user-data-dir={profile}",
                # nothing may leave localhost: every other host goes to a proxy that is not there (loopback
                # always bypasses a proxy), and the performance log below records every request that was attempted
                "--proxy-server=http://127.0.0.1:9"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# Waits until the page, MathJax's first typesetting and the fonts are done, then reports what it sees.
INSPECT = """
const done = arguments[arguments.length - 1];
(async () => {
  if (document.readyState !== "complete") await new Promise(r => window.addEventListener("load", r));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;
  await new Promise(r => setTimeout(r, 100));
  const math = [...document.querySelectorAll("span.math, div.math")];
  done({
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    math: math.length,
    untypeset: math.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 60)),
    mjx: document.querySelectorAll("mjx-container").length,
    mathErrors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 60)),
    title: document.title,
  });
})().catch(e => done({error: String(e)}));
"""


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.webSocketCreated":
            urls.append(msg["params"]["url"])
    return urls


@pytest.fixture(scope="session")
def visited(site, server, browser):
    """Every page of the site, opened in Chromium: what each showed, logged and requested."""
    base, served = server
    browser.get("about:blank")  # off the browser's own start page, then start with empty logs
    browser.get_log("browser"), browser.get_log("performance")
    seen = {}
    for page in pages(site):
        browser.get(f"{base}/{page}")
        info = browser.execute_async_script(INSPECT)
        info["console"] = [e["message"] for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        info["requests"] = _requests(browser)
        seen[page] = info
    return seen


def test_every_page_loads_without_console_errors(visited):
    assert len(visited) >= 10
    bad = {p: i.get("error") or i["console"] for p, i in visited.items() if i.get("error") or i["console"]}
    assert not bad, f"console errors: {json.dumps(bad, indent=1)[:3000]}"


def test_no_request_leaves_localhost(visited, server):
    base, served = server
    local = urlsplit(base).netloc
    outside = {p: sorted({u for u in i["requests"] if not u.startswith(("data:", "blob:", "about:"))
                          and urlsplit(u).netloc != local})
               for p, i in visited.items()}
    outside = {p: u for p, u in outside.items() if u}
    assert not outside, f"requests to other hosts: {json.dumps(outside, indent=1)[:3000]}"
    assert sum(len(i["requests"]) for i in visited.values()) > len(visited), "the performance log recorded nothing"
    failed = sorted({path for path, status in served if isinstance(status, int) and status >= 400})
    assert not failed, f"the server answered these with an error: {failed[:20]}"


def test_every_image_loads(visited):
    bad = {p: [im["src"] for im in i["images"] if not im["ok"]] for p, i in visited.items()}
    bad = {p: srcs for p, srcs in bad.items() if srcs}
    assert not bad, f"images that did not load: {json.dumps(bad, indent=1)[:3000]}"
    assert sum(len(i["images"]) for i in visited.values()) >= 30  # the notebooks' figures, the benchmarks' plots


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset:
    return frozenset(re.findall(r'\bid="([^"]+)"', path.read_text()))


def test_every_internal_link_resolves(site, visited, server):
    base, _ = server
    local = urlsplit(base).netloc
    broken, checked = [], 0
    for page, info in visited.items():
        for href in info["links"]:
            url = urlsplit(href)
            if url.scheme not in ("http", "https") or url.netloc != local:
                assert url.netloc not in ("localhost", "127.0.0.1") and not url.netloc.startswith(("localhost:", "127.0.0.1:")), \
                    f"{page} links another local server: {href}"
                continue
            checked += 1
            target = site / unquote(url.path).lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page} -> {href} (no such file)")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _ids(target):
                broken.append(f"{page} -> {href} (no such anchor)")
    assert checked > 100
    assert not broken, "broken links:\n" + "\n".join(sorted(set(broken))[:40])


def test_math_is_typeset(visited):
    bad = {p: i["untypeset"][:3] for p, i in visited.items() if i["untypeset"]}
    assert not bad, f"math that MathJax did not render: {bad}"
    errors = {p: i["mathErrors"][:3] for p, i in visited.items() if i["mathErrors"]}
    assert not errors, f"TeX that MathJax could not read: {errors}"
    for page in ("notebooks/02_rope.html", "notebooks/03_kv_cache.html"):
        assert visited[page]["math"] > 0 and visited[page]["mjx"] >= visited[page]["math"], \
            f"{page}: {visited[page]['mjx']} rendered formulas of {visited[page]['math']}"


def test_screenshots_for_review(visited, server, browser):
    """The front page (whole) and notebook 03 (its top and its memory calculator's static copy), as PNG."""
    import base64

    base, _ = server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shot(name, full=False):
        if full:
            height = min(browser.execute_script("return document.documentElement.scrollHeight"), 6000)
            data = browser.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})["data"]
            (SCREENSHOTS / name).write_bytes(base64.b64decode(data))
        else:
            browser.save_screenshot(str(SCREENSHOTS / name))
        assert (SCREENSHOTS / name).stat().st_size > 20_000, f"{name} looks empty"

    browser.get(f"{base}/index.html")
    browser.execute_async_script(INSPECT)
    shot("front.png", full=True)
    browser.get(f"{base}/notebooks/03_kv_cache.html")
    browser.execute_async_script(INSPECT)
    shot("notebook03.png")
    browser.execute_script("document.querySelector('.effml-widget-fallback').scrollIntoView()")
    time.sleep(0.2)
    shot("notebook03-widget.png")
    print(f"screenshots: {SCREENSHOTS}")
