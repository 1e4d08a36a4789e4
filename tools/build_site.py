"""Build the course's website from what is committed: the executed notebooks, the lab releases, the
instructor's guide, the API names and the benchmark results. Nothing is executed and nothing is fetched.

    python tools/build_site.py            # (make site) -> build/site/html/index.html
    python tools/build_site.py --out DIR  # elsewhere: DIR/html, DIR/src, DIR/doctrees

Steps: stage the pages into OUT/src, laid out as in the repository so relative links keep working
(README's course map becomes index.md; notebooks/*.ipynb and labs/*/*.ipynb are copied, each widget
replaced by its static fallback; bench/results/ becomes one page of tables and plots per device), then
run Sphinx with myst-nb (configuration: site/conf.py) into OUT/html. Staged files are rewritten only
when their content changes, so a second build redoes only what changed. Warnings are errors. The built
pages are then checked to load no script, style, font or image from another host. site/README.md says
why this tool, and how to publish the folder.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "site"
DEFAULT_OUT = ROOT / "build" / "site"

# nbgrader's markers: a release never carries them (nbgrader removes solutions and hidden tests)
RELEASE_FORBIDDEN = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def repository_url() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project.get("urls", {}).get("Repository", "").rstrip("/")


class Stage:
    """The Sphinx source folder. Files are written only when their bytes change (Sphinx then rebuilds
    only those pages); what a build did not write is deleted at the end (a removed notebook's page goes)."""

    def __init__(self, root: Path):
        self.root = root
        self.written: set[Path] = set()

    def write(self, rel: str, data: bytes | str) -> None:
        path = self.root / rel
        data = data.encode() if isinstance(data, str) else data
        self.written.add(path)
        if path.exists() and path.read_bytes() == data:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def copy(self, src: Path, rel: str | None = None) -> None:
        self.write(rel or src.relative_to(ROOT).as_posix(), src.read_bytes())

    def prune(self) -> None:
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_file() and path not in self.written:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


# ----------------------------------------------------------------------------------------------- markdown

LINK = re.compile(r"(!?\[[^\]]*\])\(([^)\s]+)\)")


PAGES = ("grading/README.md", "docs/API.md", "docs/MODELS.md", "docs/DATA.md", "bench/NOTES.md")


# repository paths whose counterpart on the site has another name
ALIASES = {"README.md": "index.md", "labs": "labs/index.md", "bench/results": "bench/index.md"}


def carried() -> set[str]:
    """The repository's files the site carries, at their own paths (a page or a download)."""
    globs = ("notebooks/*.ipynb", "labs/lab*/lab*.ipynb", "docs/models/*/*.png", "bench/results/*/*.json",
             "bench/results/*/*.png")
    files = {p.relative_to(ROOT).as_posix() for g in globs for p in ROOT.glob(g)}
    return files | {p for p in PAGES if (ROOT / p).exists()}


def rewrite_links(text: str, source: str, site_files: set[str], repo: str) -> str:
    """Relative links of a repository file ``source`` (repo-relative path): kept where the site carries the
    target (the layout is the repository's), else pointed at the file in the repository."""
    base = Path(source).parent

    def fix(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return m.group(0)
        path, _, frag = target.partition("#")
        rel = os.path.normpath((base / path).as_posix()).replace(os.sep, "/")
        if rel in site_files:
            return m.group(0)
        if rel in ALIASES:  # the repository's README is the site's front page, and so on
            return f"{label}({os.path.relpath(ALIASES[rel], base.as_posix() or '.')}{'#' + frag if frag else ''})"
        if (ROOT / rel).exists() and repo and not rel.startswith(".."):
            kind = "tree" if (ROOT / rel).is_dir() else "blob"
            return f"{label}({repo}/{kind}/main/{rel}{'#' + frag if frag else ''})"
        return m.group(0)  # Sphinx reports it (warnings are errors)

    return LINK.sub(fix, text)


def section(text: str, heading: str) -> str:
    """The lines of ``text`` from the line ``heading`` to the next heading of the same level."""
    level = heading.split(" ")[0]
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise SystemExit(f"README.md has no line {heading!r}: the site's front page is built from it") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(level + " ")), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"


def front_page(site_files: set[str], repo: str, toc: list[str]) -> str:
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    title = lines[0]
    intro_end = next(i for i in range(1, len(lines)) if lines[i].startswith("## "))
    intro = "\n".join(lines[1:intro_end]).strip()
    course = section(readme, "## The course")
    body = (
        f"{title}\n\n{intro}\n\n{course}\n"
        "## On this site\n\n"
        "- the executed **notebooks**, one page each, with the outputs, figures and tables they had when "
        "they were last run (the interactive widgets as static copies: open the notebook in JupyterLab or "
        "Colab to use them);\n"
        "- the **[lab releases](labs/index.md)** as students get them (no solutions, no hidden tests);\n"
        "- the **[instructor's guide](grading/README.md)** to releasing and grading the labs;\n"
        "- the library's **[API names](docs/API.md)**, the [shipped models](docs/MODELS.md) and "
        "[their data](docs/DATA.md);\n"
        "- the **[benchmark results](bench/index.md)**: every result file under `bench/results/`, as tables "
        "and plots.\n"
    )
    body = rewrite_links(body, "README.md", site_files, repo)
    toctree = "\n".join(toc)
    return body + f"\n```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{toctree}\n```\n"


# ---------------------------------------------------------------------------------------------- notebooks


def _widget_label(state: dict) -> str | None:
    if "_options_labels" in state and isinstance(state.get("index"), int):
        return state["_options_labels"][state["index"]]
    if "value" in state and not isinstance(state["value"], (dict, list)):
        return str(state["value"])
    return None


def widget_fallback(view: dict, models: dict) -> list[dict]:
    """A widget output's static copy: the controls' values when the notebook ran, then what its Output
    widgets held (the figure and text those values produced), as ordinary outputs."""
    controls, outputs = [], []

    def walk(model_id: str) -> None:
        model = models.get(model_id)
        if model is None:
            return
        state = model.get("state", {})
        if model.get("model_name") == "OutputModel":
            outputs.extend(state.get("outputs", []))
        label = _widget_label(state)
        if state.get("description") and label is not None:
            controls.append((state["description"], label))
        for child in state.get("children", []):
            walk(child.removeprefix("IPY_MODEL_"))

    walk(view.get("model_id", ""))
    items = "".join(
        f"<li><code>{html.escape(str(name))}</code> = <code>{html.escape(label)}</code></li>" for name, label in controls
    )
    note = (
        '<div class="effml-widget-fallback"><p><strong>An interactive widget</strong> (it runs in JupyterLab '
        "or Colab). This static page shows what it displayed for the values its controls had when the "
        f"notebook was run{':' if items else '.'}</p>" + (f"<ul>{items}</ul>" if items else "") + "</div>"
    )
    head = {"output_type": "display_data", "metadata": {}, "data": {"text/html": note, "text/plain": "widget"}}
    for out in outputs:  # Output widgets store outputs without execution counts; cells may not
        out.pop("execution_count", None)
        if out.get("output_type") == "execute_result":
            out["output_type"] = "display_data"
        out.setdefault("metadata", {})
    return [head, *outputs]


def static_notebook(path: Path, site_files: set[str], repo: str) -> str:
    """The committed notebook with each widget replaced by its static fallback (outputs kept as they are),
    and links to repository files the site does not carry pointed at the repository."""
    nb = json.loads(path.read_text())
    source = path.relative_to(ROOT).as_posix()
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            fixed = rewrite_links(text, source, site_files, repo)
            if fixed != text:
                cell["source"] = fixed
    models = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        new = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            new.extend(widget_fallback(view, models) if view else [out])
        cell["outputs"] = new
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def title_of(path: Path) -> str:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def stage_labs(stage: Stage, site_files: set[str], repo: str) -> list[str]:
    rows, pages = [], []
    for nb_path in sorted(ROOT.glob("labs/lab*/lab*.ipynb")):
        text = nb_path.read_text()
        bad = [marker for marker in RELEASE_FORBIDDEN if marker in text]
        if bad:
            raise SystemExit(f"{nb_path.relative_to(ROOT)} carries {bad}: a release has no solutions or hidden "
                             "tests (regenerate it with make labs)")
        rel = nb_path.relative_to(ROOT).as_posix()
        stage.write(rel, static_notebook(nb_path, site_files, repo))
        pages.append(rel.removeprefix("labs/").removesuffix(".ipynb"))
        rows.append(f"| [{title_of(nb_path)}]({rel.removeprefix('labs/')}) | [`{rel}`]({rel.removeprefix('labs/')}) |")
    toc = "\n".join(pages)
    stage.write("labs/index.md", (
        "# Lab releases\n\n"
        "Each lab as students get it: the nbgrader **release** in `labs/`, made by `make labs` from the "
        "sources in `solutions/`. It has the stubs to fill in and the visible tests; it has no solutions "
        "and no hidden tests (the grader keeps those, see the [instructor's guide](../grading/README.md)). "
        "To work on a lab, open its notebook in JupyterLab (`make lab`) or Colab; these pages are for "
        "reading.\n\n| lab | notebook |\n|---|---|\n" + "\n".join(rows) + "\n\n"
        f"```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{toc}\n```\n"
    ))
    return ["labs/index"]


# ---------------------------------------------------------------------------------------------- benchmarks

ENV_FIELDS = ("device_name", "torch", "cuda", "triton", "python", "cpu", "torch_threads", "timestamp_utc")


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.4g}".replace("e+", "e")
    s = str(v).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 80 else s[:77] + "…"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def is_scalar(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


MAX_ROWS = 40


def render_results(obj, name: str, plots: list[tuple[str, dict]], level: int = 4) -> list[str]:
    """Markdown for one result object: its scalars as a table, a dict of records as a table (one row per
    key), a list of records as a table (the first MAX_ROWS, folded), nested parts under their own heading.
    Dicts of records with tokens_per_s are also queued for a bar chart."""
    blocks: list[str] = []
    if isinstance(obj, list):
        records = [r for r in obj if isinstance(r, dict)]
        if records and len(records) == len(obj):
            cols = list(dict.fromkeys(k for r in records for k, v in r.items() if is_scalar(v)))
            shown = records[:MAX_ROWS]
            note = f"{len(records)} rows" + (f", the first {MAX_ROWS} shown (all in the JSON file)" if len(records) > MAX_ROWS else "")
            blocks.append(f"<details><summary>{html.escape(name)}: {note}</summary>\n\n"
                          + md_table(cols, [[r.get(c, "") for c in cols] for r in shown]) + "\n</details>\n")
        elif all(is_scalar(v) for v in obj):
            blocks.append(f"`{name}`: " + ", ".join(fmt(v) for v in obj[:24]) + (" …" if len(obj) > 24 else "") + "\n")
        return blocks
    if not isinstance(obj, dict):
        return [f"`{name}`: {fmt(obj)}\n"]
    scalars = [(k, v) for k, v in obj.items() if is_scalar(v) and not (isinstance(v, str) and "\n" in v)]
    if scalars:
        blocks.append(md_table(["quantity", "value"], scalars))
    for k, v in obj.items():
        if isinstance(v, str) and "\n" in v:
            blocks.append(f"<details><summary>{html.escape(k)}</summary>\n\n```text\n{v.strip()}\n```\n\n</details>\n")
    for k, v in obj.items():
        if isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()) and \
                any(is_scalar(x) for r in v.values() for x in r.values()):
            cols = list(dict.fromkeys(c for r in v.values() for c, x in r.items() if is_scalar(x)))
            blocks.append(f"{'#' * level} {k}\n\n" + md_table([k] + cols, [[key] + [r.get(c, "") for c in cols] for key, r in v.items()]))
            if all("tokens_per_s" in r for r in v.values()):
                plots.append((k, v))
            rest = {key: {c: x for c, x in r.items() if not is_scalar(x)} for key, r in v.items()}
            for key, r in rest.items():
                for c, x in r.items():
                    blocks += render_results(x, f"{k} / {key} / {c}", plots, level + 1)
        elif isinstance(v, (dict, list)):
            inner = render_results(v, k, plots, level + 1)
            if isinstance(v, dict) and inner:
                inner.insert(0, f"{'#' * level} {k}\n")
            blocks += inner
    return blocks


def tokens_plot(title: str, decoders: dict, device: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(decoders)
    tps = [decoders[n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * len(names)), dpi=100)
    bars = ax.barh(names, tps, color="#4c72b0")
    for bar, n in zip(bars, names):
        frac = decoders[n].get("fraction_of_copy_bandwidth")
        label = f" {decoders[n]['tokens_per_s']:.1f}" + (f"  ({frac:.0%} of copy bw)" if isinstance(frac, float) else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (higher is better)")
    ax.set_title(f"{title} on {device}", fontsize=10)
    ax.set_xlim(0, max(tps) * 1.45)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def stage_bench(stage: Stage, site_files: set[str], repo: str) -> list[str]:
    results = ROOT / "bench" / "results"
    devices = sorted(p for p in results.iterdir() if p.is_dir() and any(p.glob("*.json")))
    if (ROOT / "bench" / "NOTES.md").exists():
        stage.write("bench/NOTES.md", rewrite_links((ROOT / "bench" / "NOTES.md").read_text(), "bench/NOTES.md", site_files, repo))
    index_rows, pages = [], []
    for dev in devices:
        files = sorted(dev.glob("*.json"))
        for f in files:
            stage.copy(f)
            if f.with_suffix(".png").exists():
                stage.copy(f.with_suffix(".png"))
        first = json.loads(files[0].read_text())
        device_name = first.get("env", {}).get("device_name") or dev.name
        parts = [f"# Benchmarks on {device_name}\n\n"
                 f"Every result file in `bench/results/{dev.name}/`, as the benchmark scripts in `bench/` wrote it "
                 "(`measure.save_result`): the environment of the run, then its numbers. Tables show the values as "
                 "recorded (seconds, bytes, bytes/s, fractions); the figures are the scripts' own plots where one "
                 "was committed, and bar charts of tokens/s drawn by the site's build from the JSON. "
                 "[The notes](NOTES.md) tell how the numbers came about.\n"]
        for f in files:
            data = json.loads(f.read_text())
            env = data.get("env", {})
            parts.append(f"## {f.stem}\n\n[`bench/results/{dev.name}/{f.name}`](results/{dev.name}/{f.name})\n")
            env_rows = [(k, env[k]) for k in ENV_FIELDS if env.get(k) is not None]
            if env_rows:
                parts.append("Environment: " + "; ".join(f"{k} `{fmt(v)}`" for k, v in env_rows) + ".\n")
            if f.with_suffix(".png").exists():
                parts.append(f"![{f.stem}: the benchmark's plot](results/{dev.name}/{f.stem}.png)\n")
            plots: list[tuple[str, dict]] = []
            body = render_results(data.get("results", data), f.stem, plots, level=3)
            for i, (title, decoders) in enumerate(plots):
                rel = f"bench/plots/{dev.name}/{f.stem}-{i}.png"
                stage.write(rel, tokens_plot(f"{f.stem}: {title}", decoders, device_name))
                parts.append(f"![{f.stem}: tokens/s of each {title} entry](plots/{dev.name}/{f.stem}-{i}.png)\n")
            parts += body
        stage.write(f"bench/{dev.name}.md", "\n".join(parts))
        pages.append(dev.name)
        index_rows.append(f"| [{device_name}]({dev.name}.md) | `bench/results/{dev.name}/` | "
                          + ", ".join(f"`{f.stem}`" for f in files) + " |")
    toc = "\n".join(pages + (["NOTES"] if "bench/NOTES.md" in site_files else []))
    stage.write("bench/index.md", (
        "# Benchmark results\n\n"
        "Benchmarks are scripts (`bench/*.py`), not tests: the median of repeated runs after warm-up, CUDA "
        "events on a GPU, the environment recorded in every result file. GPU figures come from NVIDIA H100 and "
        "H200 machines; CPU figures are for relative comparisons only. One page per device:\n\n"
        "| device | folder | result files |\n|---|---|---|\n" + "\n".join(index_rows) + "\n\n"
        "[bench/NOTES.md](NOTES.md) records every run and what changed between them.\n\n"
        f"```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{toc}\n```\n"
    ))
    return ["bench/index"]


# ----------------------------------------------------------------------------------------------------- build


def stage_all(src: Path) -> Stage:
    repo = repository_url()
    stage = Stage(src)
    site_files = carried()
    for nb_path in sorted(ROOT.glob("notebooks/*.ipynb")):
        stage.write(nb_path.relative_to(ROOT).as_posix(), static_notebook(nb_path, site_files, repo))
    for png in sorted(ROOT.glob("docs/models/*/*.png")):
        stage.copy(png)
    toc_labs = stage_labs(stage, site_files, repo)
    toc_bench = stage_bench(stage, site_files, repo)
    for rel in ("grading/README.md", "docs/API.md", "docs/MODELS.md", "docs/DATA.md"):
        stage.write(rel, rewrite_links((ROOT / rel).read_text(), rel, site_files, repo))
    toc = [p.removesuffix(".ipynb") for p in sorted(x.relative_to(src).as_posix() for x in stage.written
                                                      if x.suffix == ".ipynb" and x.parent == src / "notebooks")]
    toc += toc_labs + ["grading/README", "docs/API", "docs/MODELS", "docs/DATA"] + toc_bench
    stage.write("index.md", front_page(site_files, repo, toc))
    stage.prune()
    return stage


EXTERNAL_ASSET = re.compile(r"""<(?:script|img|iframe|source|video|audio)\b[^>]*\bsrc=["']?(?:https?:)?//"""
                            r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//""", re.I)


def check_offline(html_dir: Path) -> None:
    """Fail if a built page, style or script names an asset on another host."""
    bad = []
    for path in html_dir.rglob("*"):
        if path.suffix in (".html", ".css") and EXTERNAL_ASSET.search(path.read_text(errors="replace")):
            bad.append(path.relative_to(html_dir).as_posix())
    if bad:
        raise SystemExit("these built files load something from another host (the site must be offline): "
                         + ", ".join(sorted(bad)))


def build(out: Path = DEFAULT_OUT, quiet: bool = True) -> Path:
    """Stage and build the site into ``out``; returns the folder of the HTML (its index.html is the front page)."""
    t0 = time.perf_counter()
    src, html_dir, doctrees = out / "src", out / "html", out / "doctrees"
    stage_all(src)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(CONF_DIR), "-d", str(doctrees),
           "-W", "--keep-going", str(src), str(html_dir)]
    if quiet:
        cmd.insert(3, "-q")
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    subprocess.run(cmd, check=True, env=env)
    check_offline(html_dir)
    print(f"site: {html_dir / 'index.html'} ({time.perf_counter() - t0:.1f} s)")
    return html_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="build folder (default build/site)")
    parser.add_argument("--verbose", action="store_true", help="Sphinx's progress, not only its warnings")
    args = parser.parse_args(argv)
    try:
        build(args.out.resolve(), quiet=not args.verbose)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"sphinx-build failed (exit {e.returncode}); its messages are above") from None


if __name__ == "__main__":
    main()
