"""Build the alignbook website from the notebooks into docs/_site, offline.

The build first executes each notebook the way `nbdev_test` does, so cells flagged `slow`, `gpu` or `notest` and
`#| eval: false` cells are skipped. It then applies nbdev's documentation processors (directives, `show_doc`,
hidden cells), adds the reproduction results found under `runs/` and one API page per module. Sphinx with myst-nb
renders the result and never re-executes a cell.

Usage: python docs/build.py [--no-execute] [--runs runs] [--out docs/_site] [--only STEM ...]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NBS = ROOT / "nbs"
SKIP_FLAGS = {"slow", "gpu", "notest"}
SECTIONS = {"core": "Core", "chapters": "Chapters", "tutorials": "Tutorials"}


def section_of(notebook: Path) -> str:
    if notebook.parent.name == "tutorials":
        return "tutorials"
    return "core" if int(notebook.name.split("_")[0]) < 10 else "chapters"


def execute_notebook(args: tuple[str, str, bool]) -> tuple[str, str]:
    """Run the notebook's cells like nbdev_test and write it, with outputs, to `dst`."""
    src, dst, run = Path(args[0]), Path(args[1]), args[2]
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell

    nb = read_nb(src)
    error = ""
    if run:
        def no_eval(cell):
            if cell.cell_type != "code" or "nbdev_export(" in cell.source:
                return True
            options = [line.strip()[2:].strip() for line in cell.source.splitlines() if line.strip().startswith("#|")]
            if any(option.replace(" ", "") == "eval:false" for option in options):
                return True
            return bool(SKIP_FLAGS & {word for option in options for word in option.split()})

        os.environ.setdefault("MPLBACKEND", "Agg")
        shell = CaptureShell(src)
        os.chdir(src.parent)
        try:
            shell.run_all(nb, exc_stop=True, preproc=no_eval)
        except Exception as err:  # the page is still built, without the outputs after the failing cell
            error = f"{type(err).__name__}: {err}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    return str(src), error


def process_for_docs(path: Path) -> str:
    """Apply nbdev's documentation processors (hide, export, show_doc, ...) in place; return a warning or ''."""
    from execnb.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults, exec_show_docs

    class WithoutShowDocExecution(FilterDefaults):
        def base_procs(self):
            return [p for p in super().base_procs() if p is not exec_show_docs]

    nb = read_nb(path)
    for cell in nb.cells:
        # nbdev runs exported and import cells again to render show_doc; slow and GPU cells must not run here.
        first_lines = [line.strip() for line in cell.source.splitlines() if line.strip().startswith("#|")]
        flags = {word for line in first_lines for word in line[2:].split()}
        if cell.cell_type == "code" and flags & SKIP_FLAGS:
            cell.source = "#| eval: false\n" + cell.source
    try:
        FilterDefaults()(nb)
        warning = ""
    except Exception as err:
        nb = read_nb(path)
        WithoutShowDocExecution()(nb)
        warning = f"{path.name}: show_doc tables left out because a cell failed to re-run ({err})"
    _title_from_frontmatter(nb)
    _quarto_to_myst(nb)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    write_nb(nb, path)
    return warning


_QUARTO_ATTRS = re.compile(r'\{target="_blank"[^}]*\}')


_CALLOUT = re.compile(r'^:::\s*\{\.callout-(note|tip|warning|important|caution)(?:\s+title="([^"]*)")?[^}]*\}\s*$')


def _callouts_to_admonitions(text: str) -> str:
    """Rewrite Quarto callouts (`::: {.callout-warning}`, optional heading as title) as MyST admonitions."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _CALLOUT.match(lines[i].strip())
        if not match:
            out.append(lines[i])
            i += 1
            continue
        kind, title = match.group(1), match.group(2)
        i += 1
        if title is None and i < len(lines) and lines[i].startswith("#"):
            title = lines[i].lstrip("#").strip()
            i += 1
        out += [f":::{{admonition}} {title}", f":class: {kind}"] if title else [f":::{{{kind}}}"]
    return "\n".join(out)


def _quarto_to_myst(nb) -> None:
    """Translate what nbdev leaves for Quarto into MyST: callouts, and cell options (`#| echo: false`) as tags."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "callout-" in cell.source:
            cell.source = _callouts_to_admonitions(cell.source)
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        options = [line for line in lines if line.strip().startswith("#|")]
        if any(line.replace(" ", "") == "#|echo:false" for line in options):
            cell.metadata.setdefault("tags", []).append("remove-input")
        cell.source = "\n".join(line for line in lines if line not in options)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/markdown" in data:
                text = data["text/markdown"]
                text = "".join(text) if isinstance(text, list) else text
                text = _QUARTO_ATTRS.sub("", text)
                # show_doc opens with a horizontal rule, which docutils rejects inside an output block.
                data["text/markdown"] = text[3:].lstrip("\n") if text.startswith("---\n") else text


def _title_from_frontmatter(nb) -> None:
    """nbdev moves the H1 title and `>` subtitle into Quarto front matter; put them back as Markdown for Sphinx."""
    import yaml
    from execnb.nbio import mk_cell

    if not nb.cells or nb.cells[0].cell_type != "raw" or not nb.cells[0].source.startswith("---"):
        return
    meta = yaml.safe_load(nb.cells[0].source.strip().strip("-")) or {}
    heading = f"# {meta.get('title', 'Untitled')}"
    if meta.get("description"):
        heading += f"\n\n> {meta['description']}"
    nb.cells[0] = mk_cell(heading, cell_type="markdown")


def localise_doc_links(site: Path) -> int:
    """Point nbdev's symbol links (written for the Quarto site at `doc_host`) at this site's API pages.

    nbdev turns a backticked name into a link to `<doc_host><doc_baseurl>/<page>.html#<name>`, where the page is
    named after the notebook (`rpsw.html` documents `alignbook.sliced`). The package's `_modidx.py` maps each such
    link to its dotted name, and this site documents that object at `api/<module>.html#<dotted name>`. Links to
    names without an API entry go to the module's page. Returns the number of links changed.
    """
    from alignbook._modidx import d as index

    base = (index["settings"].get("doc_host", "") + index["settings"].get("doc_baseurl", "")).rstrip("/")
    if not base:
        return 0
    targets: dict[str, str] = {}  # "rpsw.html#projected_costs" -> "alignbook.sliced.projected_costs"
    page_module: dict[str, str] = {}  # "rpsw" -> "sliced"
    for module, symbols in index["syms"].items():
        for dotted, (link, _) in symbols.items():
            targets[link] = dotted
            page_module[link.split(".html")[0]] = module.split(".", 1)[1]
    api_ids = {page.stem: set(re.findall(r'id="([\w.]+)"', page.read_text())) for page in (site / "api").glob("*.html")}
    pattern = re.compile(re.escape(base) + r"/(\w+)\.html(?:#([\w.]+))?")
    changed = 0
    for page in site.rglob("*.html"):
        prefix = "../" * (len(page.relative_to(site).parts) - 1)

        def local(match: re.Match) -> str:
            module = page_module.get(match.group(1))
            if module not in api_ids:
                return match.group(0)
            dotted = targets.get(f"{match.group(1)}.html#{match.group(2)}")
            return f"{prefix}api/{module}.html" + (f"#{dotted}" if dotted in api_ids[module] else "")

        text = page.read_text()
        new, count = pattern.subn(local, text)
        if count:
            page.write_text(new)
            changed += count
    return changed


def chapter_banner(notebook: Path) -> str | None:
    """Return Markdown naming the paper a chapter notebook implements, read from `alignbook.reproduce.CHAPTERS`."""
    from alignbook.reproduce import CHAPTERS

    module = _default_exp(notebook)
    for chapter in CHAPTERS.values():
        if chapter.module == f"alignbook.{module}":
            arxiv = f", [arXiv {chapter.arxiv}](https://arxiv.org/abs/{chapter.arxiv})" if chapter.arxiv else ""
            return (f":::{{admonition}} Paper\n*{chapter.paper}*{arxiv}. Run the reproduction with "
                    f"`alignbook reproduce {chapter.name}`; the results of the last run are on the "
                    f"[reproductions page](../reproductions.md).\n:::\n")
    return None


def _default_exp(notebook: Path) -> str | None:
    for cell in json.loads(notebook.read_text())["cells"]:
        source = "".join(cell["source"])
        if "#| default_exp" in source:
            return source.split("#| default_exp", 1)[1].split()[0]
    return None


def insert_banner(path: Path, banner: str) -> None:
    """Put `banner` right after the notebook's title cell."""
    nb = json.loads(path.read_text())
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).lstrip().startswith("# "):
            nb["cells"].insert(index + 1, {"cell_type": "markdown", "metadata": {}, "source": banner})
            break
    path.write_text(json.dumps(nb, indent=1))


def write_api_pages(src: Path) -> list[str]:
    """Write one Sphinx autodoc page per exported module and return the page names."""
    pages = []
    modules = sorted(p.stem for p in (ROOT / "alignbook").glob("*.py") if not p.stem.startswith("_"))
    (src / "api").mkdir(parents=True, exist_ok=True)
    for module in modules:
        name = f"alignbook.{module}"
        try:
            importlib.import_module(name)
        except Exception as err:  # document the rest of the package even when one module fails to import
            print(f"docs: skipping API page for {name}: {err}", file=sys.stderr)
            continue
        (src / "api" / f"{module}.md").write_text(
            f"# `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n   :members:\n   :show-inheritance:\n```\n")
        pages.append(f"api/{module}")
    return pages


def write_reproductions(src: Path, runs: Path) -> None:
    """Write the reproductions page from runs/summary.md and each chapter's metrics and figures, when present."""
    lines = ["# Reproductions", ""]
    if not (runs / "summary.md").exists():
        lines += ["No reproduction results were found when this site was built. Run `alignbook reproduce all` "
                  "(or `make demo`), then `make docs`, to show the figures and metrics here."]
    else:
        summary = (runs / "summary.md").read_text().split("\n", 1)[1]
        lines += [f"Results of `alignbook reproduce` read from `{runs}` when the site was built.", "", summary]
        figures = src / "figures"
        for chapter_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
            lines += ["", f"({chapter_dir.name})=", f"## {chapter_dir.name}", ""]
            metrics = chapter_dir / "metrics.json"
            if metrics.exists():
                data = json.loads(metrics.read_text())
                lines += ["| metric | value |", "|---|---|"]
                lines += [f"| {k} | {_short(v)} |" for k, v in sorted(data.items()) if not isinstance(v, (dict, list))]
                lines.append("")
            for png in sorted(chapter_dir.glob("*.png")):
                target = figures / chapter_dir.name / png.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(png, target)
                lines += [f"![{png.stem}](figures/{chapter_dir.name}/{png.name})", ""]
    (src / "reproductions.md").write_text("\n".join(lines) + "\n")


def write_benchmarks(src: Path) -> None:
    """Join the per-module benchmark records in docs/benchmarks/ into one page."""
    parts = [(DOCS / "benchmarks.md").read_text()]
    parts += [p.read_text() for p in sorted((DOCS / "benchmarks").glob("*.md"))]
    (src / "benchmarks.md").write_text("\n\n".join(parts) + "\n")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_index(src: Path, pages: dict[str, list[str]], api: list[str]) -> None:
    parts = ["# alignbook", "", "```{include} ../../../README.md\n:start-line: 1\n```", ""]
    for key, caption in SECTIONS.items():
        if pages.get(key):
            parts += ["```{toctree}", f":caption: {caption}", ":maxdepth: 1", "", *pages[key], "```", ""]
    parts += ["```{toctree}", ":caption: Results and reference", ":maxdepth: 1", "", "reproductions",
              "benchmarks", "contributing", *api, "```", ""]
    (src / "index.md").write_text("\n".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="render the notebooks without running them")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="folder written by `alignbook reproduce`")
    parser.add_argument("--out", default=str(DOCS / "_site"), help="output folder of the HTML site")
    parser.add_argument("--only", nargs="*", default=None, help="notebook stems to include (default: all)")
    args = parser.parse_args(argv)

    src = DOCS / "_build" / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    notebooks = sorted(p for p in NBS.rglob("*.ipynb") if not any(part.startswith((".", "_")) for part in p.parts))
    if args.only:
        notebooks = [p for p in notebooks if p.stem in args.only]
    jobs = [(str(nb.resolve()), str(src / section_of(nb) / nb.name), not args.no_execute) for nb in notebooks]
    # One notebook after another in this process: each gets its own IPython shell. NOTE: running them in a
    # process pool killed the workers (BrokenProcessPool, cause not found), so there is no parallel option.
    results = [execute_notebook(job) for job in jobs]
    os.chdir(ROOT)
    failures = [(s, e) for s, e in results if e]
    pages: dict[str, list[str]] = {}
    for nb in notebooks:
        dst = src / section_of(nb) / nb.name
        if warning := process_for_docs(dst):
            print(f"docs: {warning.splitlines()[0]}", file=sys.stderr)
        if section_of(nb) == "chapters" and (banner := chapter_banner(nb)):
            insert_banner(dst, banner)
        pages.setdefault(section_of(nb), []).append(f"{section_of(nb)}/{nb.stem}")
    shutil.copy(DOCS / "contributing.md", src / "contributing.md")
    write_benchmarks(src)
    write_reproductions(src, Path(args.runs))
    write_index(src, pages, write_api_pages(src))
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(DOCS), str(src), args.out]
    result = subprocess.run(command)
    localise_doc_links(Path(args.out))
    for source, error in failures:
        print(f"docs: {source} stopped executing at {error}; its page shows the outputs up to that cell",
              file=sys.stderr)
    print(f"Site: {Path(args.out).resolve() / 'index.html'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
