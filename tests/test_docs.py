"""Build the website without executing notebooks and open two pages in headless Chromium."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "--no-execute", "--out", str(out),
                             "--runs", str(out / "no-runs")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "build-stderr.txt").write_text(result.stderr)
    return out


def _chromium(url: str, profile: Path, *extra: str) -> str:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _rendered_page(page: Path) -> tuple[str, Path]:
    shots = Path(tempfile.mkdtemp(prefix="alignbook-docs-"))
    dom = _chromium(page.as_uri(), shots / "profile", "--dump-dom")
    _chromium(page.as_uri(), shots / "profile", "--window-size=1280,1600",
              f"--screenshot={shots / (page.stem + '.png')}")
    return dom, shots / (page.stem + ".png")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_index_page_renders(site):
    dom, shot = _rendered_page(site / "index.html")
    assert "<title>alignbook" in dom
    assert "Chapters" in dom or "Core" in dom
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chapter_page_typesets_math(site):
    pages = sorted((site / "chapters").glob("*.html")) or sorted((site / "core").glob("00_core.html"))
    page = pages[0]
    dom, shot = _rendered_page(page)
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert "alignbook" in title
    assert "<mjx-container" in dom, "MathJax did not typeset any equation"
    text = re.sub(r"<script.*?</script>|<[^>]+>", " ", dom, flags=re.S)
    assert "$$" not in text
    assert shot.stat().st_size > 10_000


def test_site_has_search_and_offline_mathjax(site):
    assert (site / "search.html").exists()
    assert (site / "searchindex.js").stat().st_size > 1000
    assert list(site.rglob("_static/mathjax/tex-chtml*.js")) or list(site.rglob("_static/mathjax/**/*.js"))
    index = (site / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in index


def test_chapter_pages_keep_api_entries_and_local_links(site):
    stderr = (site / "build-stderr.txt").read_text()
    assert "directive_unknown" not in stderr, [l for l in stderr.splitlines() if "directive" in l]
    assert "show_doc tables left out" not in stderr, [l for l in stderr.splitlines() if "show_doc" in l]
    pages = sorted((site / "chapters").glob("*.html"))
    assert pages, "no chapter page was built"
    for page in pages:
        html = page.read_text()
        assert 'class="rubric"' in html, f"{page.name} shows no show_doc entry"
        assert "alignbook.github.io" not in html, f"{page.name} links to the Quarto site instead of api/"
        assert "callout-" not in html, f"{page.name} shows a Quarto callout that was not rendered"
        assert re.search(r'class="(admonition warning|warning admonition)"', html), f"{page.name} lost its limitations callout"
    wpo = (site / "chapters" / "11_wpo.html").read_text()
    assert 'href="../api/wpo.html#alignbook.wpo.wpo_weights"' in wpo
