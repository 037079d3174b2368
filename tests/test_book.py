"""The book: its notebooks agree with their sources, the smoke build leaves the user's book alone,
and the smoke book reads cleanly in a real browser (desktop and phone width).

The smoke book is built once per session into a folder of its own (``CXRCORE_SMOKE_OUT`` to
keep it, e.g. to look at the screenshots; a temporary folder otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GLUE_REF = re.compile(r"\{glue(?::[a-z]+)?\}`([^`]+)`|```\{glue(?::[a-z]+)?\}\s+([^\s`]+)")
# the user's book: a smoke build must not touch it
USER_BOOK = (ROOT / "_build" / "html", ROOT / "book" / "_generated")
SCREENSHOT_PAGES = ("book/intro.html", "book/_generated/perturbation_panel.html", "book/_generated/chestxdet10.html",
                    "book/_generated/teaching.html")

sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402  (book/build.py)


# -- fast checks (no build) ------------------------------------------------------------------
def test_committed_notebooks_agree_with_their_sources():
    """notebooks/*.ipynb are what `make notebooks` makes of notebooks/*.py (the scikit-learn MOOC's guard)."""
    stale = build.sync_notebooks(check=True)
    assert not stale, f"out of date with their .py source: {stale}; run `make notebooks` and commit them"
    for src in (ROOT / "notebooks").glob("*.py"):
        nb = json.loads(src.with_suffix(".ipynb").read_text())
        first = nb["cells"][0]
        assert "remove-cell" in first["metadata"]["tags"] and "except ImportError" in "".join(first["source"])
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{src.stem}: outputs committed"


def test_committed_notebooks_are_tracked_and_not_ignored():
    tracked = set(subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    for src in (ROOT / "notebooks").glob("*.py"):
        assert f"notebooks/{src.stem}.ipynb" in tracked, f"notebooks/{src.stem}.ipynb is not committed"


def test_the_sync_guard_fails_on_a_stale_notebook(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "encoders.py", notebooks / "encoders.py")
    monkeypatch.setattr(build, "NOTEBOOKS", notebooks)
    assert build.sync_notebooks(check=True) == ["encoders.ipynb"]
    assert build.sync_notebooks() == ["encoders.ipynb"] and build.sync_notebooks(check=True) == []
    with (notebooks / "encoders.py").open("a") as f:
        f.write("\n# %%\nprint('changed')\n")
    assert build.sync_notebooks(check=True) == ["encoders.ipynb"]
    (notebooks / "orphan.ipynb").write_text("{}")
    with pytest.raises(SystemExit, match="no .py source"):
        build.sync_notebooks(check=True)


@pytest.mark.parametrize("out", [ROOT, ROOT / "_build", ROOT / "_build" / "html", ROOT / "book" / "_generated",
                                 ROOT / "book", ROOT / "notebooks", ROOT / "book" / "_generated" / "x"])
def test_the_smoke_build_refuses_the_default_books_folders(out):
    with pytest.raises(SystemExit, match="default book"):
        build.layout_for(out, smoke=True)


def test_the_smoke_build_has_folders_of_its_own(tmp_path):
    lay = build.layout_for(tmp_path / "s", smoke=True)
    assert lay.generated == tmp_path / "s" / "_generated" and lay.html == tmp_path / "s" / "_build" / "html"
    assert build.layout_for(None, smoke=True).output == build.SMOKE_OUT
    assert build.layout_for(None, smoke=False).generated == build.GENERATED


def test_binder_environment_pins_every_dependency_with_cpu_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    req = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    lines = [line.strip() for line in req if line.strip() and not line.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    pins = {}
    for line in lines:
        if line.startswith("--"):
            continue
        name, _, version = line.partition("==")
        assert version, f"binder/requirements.txt: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    assert pins["torch"].endswith("+cpu") and pins["torchvision"].endswith("+cpu")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower())
        assert name in pins, f"pyproject.toml needs {dep!r}, which binder/requirements.txt does not pin"
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK) and "--no-deps -e ." in post.read_text()


# -- the smoke build -----------------------------------------------------------------------
def _snapshot(folders) -> dict[str, tuple]:
    """Every file under ``folders``: size, mtime and (for small files) content hash."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")) if folder.exists() else ():
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                digest = hashlib.sha1(p.read_bytes()).hexdigest() if st.st_size < 2_000_000 else ""
                out[str(p)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _build_smoke(out: Path) -> dict:
    """Build the smoke book into ``out``, the user's book snapshotted before and after, sentinels in it."""
    created, sentinels = [], []
    for folder in USER_BOOK:
        if not folder.exists():
            folder.mkdir(parents=True)
            created.append(folder)
        s = folder / f".smoke-sentinel-{uuid.uuid4().hex[:8]}"
        s.write_text("the smoke build must leave this file alone\n")
        sentinels.append(s)
    before = _snapshot(USER_BOOK)
    try:
        if os.environ.get("CXRCORE_SMOKE_REUSE") and (out / "_build" / "html" / "index.html").is_file():
            built = False  # a developer's rerun of the checks on a smoke book already built there
        else:
            proc = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--smoke", "--out", str(out)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=3000)
            if proc.returncode != 0:
                return {"error": f"smoke build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"}
            built = True
        after = _snapshot(USER_BOOK)
    finally:
        for s in sentinels:
            s.unlink(missing_ok=True)
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
    return {"before": before, "after": after, "built": built}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The smoke book, built once per test session in a folder of its own.

    Under pytest-xdist every worker that runs a test needing it asks; the first builds while
    holding a lock, the others wait and read its record (the pattern pytest-xdist documents
    for session fixtures), so the user's book sees one build and one set of sentinels.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # a worker's base is .../pytest-N/popen-gwK: its parent is this session's, common to the workers
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = Path(os.environ.get("CXRCORE_SMOKE_OUT") or shared / "smoke-book")
    record = shared / "smoke-book.json"
    with FileLock(str(record) + ".lock"):
        if record.is_file():
            rec = json.loads(record.read_text())
        else:
            out.mkdir(parents=True, exist_ok=True)
            rec = _build_smoke(out)
            tmp = record.with_suffix(".part")
            tmp.write_text(json.dumps(rec))
            tmp.replace(record)
    if "error" in rec:
        pytest.fail(rec["error"])
    return {"out": out, "html": out / "_build" / "html", "generated": out / "_generated",
            "before": {k: tuple(v) for k, v in rec["before"].items()},
            "after": {k: tuple(v) for k, v in rec["after"].items()}, "built": rec["built"]}


@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_the_smoke_build_leaves_the_users_book_untouched(smoke):
    if not smoke["built"]:
        pytest.skip("CXRCORE_SMOKE_REUSE: no build ran")
    changed = sorted(k for k in set(smoke["before"]) | set(smoke["after"]) if smoke["before"].get(k) != smoke["after"].get(k))
    assert not changed, "the smoke build touched the user's book: " + "; ".join(
        f"{k}: before {smoke['before'].get(k)}, after {smoke['after'].get(k)}" for k in changed[:10])
    assert any(".smoke-sentinel-" in k for k in smoke["after"])
    assert (smoke["html"] / "index.html").is_file() and (smoke["generated"] / "teaching.ipynb").is_file()


def _glued_keys(nb_path: Path) -> set[str]:
    nb = json.loads(nb_path.read_text())
    keys = set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                keys.add(name)
    return keys


def _glue_key(ref: str) -> str:
    """The key a glue reference names: ``key``, ``key:format`` or, from another page, ``path::key:format``."""
    key = ref.split("::", 1)[-1]
    return key.rsplit(":", 1)[0] if ":" in key else key


def _referenced_keys() -> set[str]:
    keys = set()
    for md in (ROOT / "book").rglob("*.md"):
        for a, b in GLUE_REF.findall(md.read_text()):
            keys.add(_glue_key(a or b))
    return keys


def test_glue_references_across_pages_name_their_key():
    assert _glue_key("num-x-auc") == "num-x-auc" and _glue_key("num-x-auc:.3f") == "num-x-auc"
    assert _glue_key("_generated/encoders.ipynb::num-encoders-gpuh-total:s") == "num-encoders-gpuh-total"


@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_glued_keys_are_namespaced_saved_and_resolve(smoke):
    generated = smoke["generated"]
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
            assert (generated / Path(path).relative_to("_generated")).is_file(), \
                f"{md.name} shows {path}, which the build did not produce"
    assert (generated / "exercises" / "teaching_exercises.ipynb").is_file(), "no students' copy of the teaching page"


# -- in the browser ------------------------------------------------------------------------
_LIST_REPR = re.compile(r"\[\s*(?:'[^'\n]*'|\"[^\"\n]*\")(?:\s*,\s*(?:'[^'\n]*'|\"[^\"\n]*\"))*\s*\]")
_NUM_LIST_LINE = re.compile(r"^\s*\[\s*-?[\d.eE+-]+(?:\s*,\s*-?[\d.eE+-]+)+\s*\]\s*$", re.M)
_LONG_DECIMAL = re.compile(r"\d\.\d{5,}")

_PAGE_JS = """() => {
  const main = document.querySelector('main') || document.body;
  const cells = Array.from(main.querySelectorAll('td, th')).map(c => c.innerText);
  const outputs = Array.from(main.querySelectorAll('.cell_output')).map(o => o.innerText);
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
  const downloads = Array.from(document.querySelectorAll('a.download, a[download]')).map(a => a.href);
  const banner = (document.querySelector('.bd-header-announcement') || {innerText: ''}).innerText;
  const figures = Array.from(main.querySelectorAll('figure')).map(f => !!f.querySelector('.caption-number'));
  const clipped = [];
  for (const t of main.querySelectorAll('table')) {
    const r = t.getBoundingClientRect();
    if (r.right <= document.documentElement.clientWidth + 1) continue;
    let el = t.parentElement, scrolls = false;
    while (el && el !== document.body) {
      const s = getComputedStyle(el).overflowX;
      if ((s === 'auto' || s === 'scroll') && el.getBoundingClientRect().right <= document.documentElement.clientWidth + 1) { scrolls = true; break; }
      el = el.parentElement;
    }
    if (!scrolls) clipped.push(t.innerText.slice(0, 60));
  }
  return {cells, outputs, links, downloads, banner, figures, clipped, text: main.innerText};
}"""


def _launch_path(url: str) -> str | None:
    """The repository path a Binder or Colab link opens (None for other links)."""
    u = urlparse(url)
    if u.netloc.endswith("mybinder.org"):
        path = parse_qs(u.query).get("urlpath", [""])[0]
        return re.sub(r"^(lab/tree|tree|notebooks)/", "", path)
    if u.netloc == "colab.research.google.com":
        m = re.match(r"^/github/[^/]+/[^/]+/blob/[^/]+/(.+)$", u.path)
        return m.group(1) if m else u.path
    return None


@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_rendered_book_in_chromium(smoke):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI (make test installs it as root)")
        pytest.skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    html = smoke["html"]
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    pages = sorted(p for p in html.rglob("*.html") if p.name not in {"genindex.html", "search.html"}
                   and not {"_static", "_sources", "_images", "_downloads"} & set(p.parts))
    assert len(pages) >= 4
    problems, tables, launches = [], 0, set()
    shots = smoke["out"] / "screenshots"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        for width in (1400, 400):
            page = browser.new_page(viewport={"width": width, "height": 1000})
            for path in pages:
                if 'http-equiv="refresh"' in path.read_text(errors="replace")[:2000].lower():
                    continue  # the root index.html only redirects to the first page
                rel = path.relative_to(html).as_posix()
                page.goto(path.as_uri(), wait_until="load")
                info = page.evaluate(_PAGE_JS)
                for t in info["clipped"]:
                    problems.append(f"{rel} at {width} px: a table runs off the page unscrollable: {t!r}")
                if width != 1400:
                    continue
                imgs = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
                problems += [f"{rel}: image {src} did not load" for src, ok, w in imgs if not (ok and w > 0)]
                text = info["text"]
                if "Traceback (most recent call last)" in text or re.search(r"\b[A-Z][a-zA-Z]*Error: ", text):
                    problems.append(f"{rel}: shows a Python traceback/error")
                if "SMOKE BUILD" not in info["banner"]:
                    problems.append(f"{rel}: no 'smoke build' banner")
                problems += [f"{rel}: table cell with more than four decimals: {c!r}" for c in info["cells"]
                             if _LONG_DECIMAL.search(c)][:3]
                if "PosixPath(" in text or "WindowsPath(" in text:
                    problems.append(f"{rel}: shows a path repr (PosixPath(...))")
                for o in info["outputs"]:
                    m = _LIST_REPR.search(o) or _NUM_LIST_LINE.search(o)
                    if m:
                        problems.append(f"{rel}: an output prints a list repr: {m.group(0)[:80]!r}")
                        break
                problems += [f"{rel}: a figure without a number" for f in info["figures"] if not f][:1]
                for link in info["links"]:
                    target = _launch_path(link)
                    if target is not None:
                        launches.add(target)
                        if target not in tracked:
                            problems.append(f"{rel}: launch link opens {target}, which is not tracked by git ({link})")
                for link in info["downloads"]:
                    local = Path(urlparse(link).path)
                    if urlparse(link).scheme == "file" and not local.is_file():
                        problems.append(f"{rel}: download link to a missing file {local}")
                tables += len(info["cells"]) > 0
                if rel.endswith("teaching.html"):
                    solutions = page.locator(".tag_solution")
                    if solutions.count() < 3:
                        problems.append(f"{rel}: expected at least 3 solution cells, found {solutions.count()}")
                    for k in range(solutions.count()):
                        shown = solutions.nth(k).locator(".cell_input, .cell_output")
                        if any(shown.nth(j).is_visible() for j in range(shown.count())):
                            problems.append(f"{rel}: solution {k + 1} is visible before the reader asks for it")
            for rel in SCREENSHOT_PAGES:
                if (html / rel).is_file():
                    page.goto((html / rel).as_uri(), wait_until="load")
                    page.wait_for_timeout(300)
                    name = Path(rel).stem
                    page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
            page.close()
        browser.close()
    print(f"screenshots: {shots}")
    assert not problems, "\n".join(problems)
    assert tables >= 1, "no rendered table found in the book"
    notebook_pages = {f"notebooks/{p.stem}.ipynb" for p in (html / "book" / "_generated").glob("*.html")
                      if (ROOT / "notebooks" / f"{p.stem}.py").is_file()}
    assert notebook_pages and notebook_pages <= launches, f"pages without a launch button: {notebook_pages - launches}"
