"""The book builds from the notebooks (smoke parameters) and renders cleanly in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GLUE_REF = re.compile(r"\{glue(?::[a-z]+)?\}`([^`]+)`|```\{glue(?::[a-z]+)?\}\s+([^\s`]+)")


def _glued_keys(nb_path: Path) -> set[str]:
    nb = json.loads(nb_path.read_text())
    keys = set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                keys.add(name)
    return keys


def _referenced_keys() -> set[str]:
    keys = set()
    for md in (ROOT / "book").rglob("*.md"):
        for a, b in GLUE_REF.findall(md.read_text()):
            keys.add(a or b)
    return keys


@pytest.fixture(scope="module")
def smoke_book() -> Path:
    proc = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert (HTML / "index.html").is_file()
    return HTML


@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_glued_keys_are_namespaced_saved_and_resolve(smoke_book):
    generated = ROOT / "book" / "_generated"
    glued = {p.stem: _glued_keys(p) for p in generated.glob("*.ipynb")}
    assert any(glued.values()), "no notebook glued anything"
    for nb, keys in glued.items():
        for key in keys:
            assert re.match(r"^(fig|tab|num)-[a-z0-9-]+$", key), f"{nb}: glue key {key!r} is not namespaced"
            if key.startswith(("fig-", "tab-")):
                ext = ".png" if key.startswith("fig-") else ".csv"
                assert (generated / "figures" / nb / f"{key}{ext}").is_file(), f"{nb}: {key} glued but not saved as a file"
    every = set().union(*glued.values())
    missing = _referenced_keys() - every
    assert not missing, f"book pages reference glue keys no notebook produced: {sorted(missing)}"
    for md in (ROOT / "book").glob("*.md"):
        for path in re.findall(r"```\{figure\}\s+(\S+)", md.read_text()):
            assert (md.parent / path).is_file(), f"{md.name} shows {path}, which the build did not produce"


@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_rendered_book_in_chromium(smoke_book):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI (make test installs it as root)")
        pytest.skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    pages = sorted(p for p in smoke_book.rglob("*.html") if p.name not in {"genindex.html", "search.html"}
                   and "_static" not in p.parts)
    assert len(pages) >= 4
    problems = []
    tables = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page()
        for html in pages:
            if 'http-equiv="refresh"' in html.read_text(errors="replace")[:2000].lower():
                continue  # the root index.html only redirects to the first page
            page.goto(html.as_uri(), wait_until="load")
            imgs = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
            for src, complete, w, h in imgs:
                if not (complete and w > 0 and h > 0):
                    problems.append(f"{html.relative_to(smoke_book)}: image {src} did not load")
            text = page.inner_text("body")
            if "Traceback (most recent call last)" in text or re.search(r"\b[A-Z][a-zA-Z]*Error: ", text):
                problems.append(f"{html.relative_to(smoke_book)}: shows a Python traceback/error")
            tables += page.evaluate("document.querySelectorAll('main table').length")
        page.goto((smoke_book / "index.html").as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(500)
        page.screenshot(path=str(smoke_book / "_screenshot_index.png"), full_page=True)
        browser.close()
    assert not problems, "\n".join(problems)
    assert tables >= 1, "no rendered table found in the book"
