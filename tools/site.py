"""Build the documentation site offline (no Quarto): one HTML page per notebook, in notebook order, with a sidebar,
each module's API (signatures, docstrings, parameter docs) under its page, an example report, a link check and
screenshots in headless Chromium.

    .venv/bin/python tools/site.py                 # build _site/
    .venv/bin/python tools/site.py --check         # build into a temporary folder, check every page and link, screenshot
"""
from __future__ import annotations

import argparse, html, importlib, inspect, json, re, shutil, subprocess, sys, tempfile
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
CSS = """
body{margin:0;font-family:system-ui,-apple-system,'Segoe UI',sans-serif}
nav.sidebar{position:fixed;top:0;left:0;bottom:0;width:230px;overflow:auto;background:#f6f7f9;border-right:1px solid #ddd;padding:14px 10px;font-size:14px}
nav.sidebar a{display:block;padding:4px 6px;color:#1f3a60;text-decoration:none;border-radius:4px}
nav.sidebar a.current{background:#dbe6f5;font-weight:600}
nav.sidebar .brand{font-weight:700;font-size:17px;margin-bottom:10px}
main.page{margin-left:260px;padding:0 24px 40px;max-width:1100px}
section.api h3{font-family:ui-monospace,monospace;font-size:15px;margin-top:22px}
section.api table{border-collapse:collapse;font-size:13px}section.api td,section.api th{border:1px solid #ccc;padding:3px 8px;text-align:left}
"""


def pages() -> list[tuple[str, Path]]:
    "(page name, notebook) in the sidebar's order: the home page, then the numbered notebooks."
    nbs = [NBS / "index.ipynb"] + sorted(NBS.glob("[0-9]*.ipynb"))
    return [("index" if nb.stem == "index" else nb.stem, nb) for nb in nbs]


def title_of(nb: Path) -> str:
    "The notebook's H1 and its one-line summary."
    cells = json.loads(nb.read_text())["cells"]
    src = "".join(next(c for c in cells if c["cell_type"] == "markdown")["source"])
    h1 = re.search(r"^# (.+)$", src, re.M)
    return h1.group(1).strip() if h1 else nb.stem


def module_of(nb: Path) -> str | None:
    "The module a notebook exports to (`#| default_exp`), if any."
    for c in json.loads(nb.read_text())["cells"]:
        m = re.search(r"#\|\s*default_exp\s+(\S+)", "".join(c["source"]))
        if m: return m.group(1)
    return None


def api_html(module: str) -> str:
    "Each exported name of `mmrlhf.<module>`: signature, docstring and a table of its parameters' docs (docments)."
    from fastcore.docments import docments
    mod = importlib.import_module(f"mmrlhf.{module}")
    out = [f"<section class='api' id='api'><h2>API: <code>mmrlhf.{module}</code></h2>"]
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name, None)
        if obj is None or not (inspect.isfunction(obj) or inspect.isclass(obj)): continue
        try: sig = str(inspect.signature(obj))
        except (TypeError, ValueError): sig = "(...)"
        out.append(f"<h3 id='{html.escape(name)}'>{html.escape(name)}{html.escape(sig if len(sig) < 300 else '(...)')}</h3>")
        out.append(f"<p>{html.escape(inspect.getdoc(obj) or '')}</p>")
        try: docs = docments(obj, full=True)
        except Exception: docs = {}
        rows = [(k, v.get("anno"), v.get("default"), v.get("docment")) for k, v in docs.items() if k != "return" and v.get("docment")]
        if rows:
            out.append("<table><tr><th>parameter</th><th>default</th><th>meaning</th></tr>" + "".join(
                f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(repr(d) if d is not inspect._empty else '')}</code></td>"
                f"<td>{html.escape(str(doc))}</td></tr>" for k, a, d, doc in rows) + "</table>")
    return "\n".join(out) + "</section>"


def sidebar(current: str, entries: list[tuple[str, str]]) -> str:
    links = "".join(f"<a href='{n}.html'{' class=current' if n == current else ''}>{html.escape(t)}</a>" for n, t in entries)
    return f"<nav class='sidebar'><div class='brand'>mmrlhf</div>{links}<a href='example-report.html'>Example report</a></nav>"


def build(out: Path) -> list[Path]:
    "Write the site into `out`; return the pages."
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    entries = [(name, title_of(nb)) for name, nb in pages()]
    written = []
    for (name, nb), (_, title) in zip(pages(), entries):
        body, _ = exporter.from_filename(str(nb))
        body = re.sub(r"<script[^>]+src=['\"]https?://[^'\"]*plot\.ly[^'\"]*['\"][^>]*></script>", "", body)  # never a CDN
        if "Plotly.newPlot" in body: body = body.replace("</head>", f"<script>{get_plotlyjs()}</script></head>", 1)
        mod = module_of(nb)
        extra = api_html(mod) if mod else ""
        body = body.replace("</head>", f"<style>{CSS}</style></head>", 1)
        body = re.sub(r"<body([^>]*)>", lambda m: f"<body{m.group(1)}>{sidebar(name, entries)}<main class='page'>", body, count=1)
        body = body.replace("</body>", f"{extra}</main></body>", 1)
        (out / f"{name}.html").write_text(body, encoding="utf-8")
        written.append(out / f"{name}.html")
    if (NBS / "images").is_dir(): shutil.copytree(NBS / "images", out / "images", dirs_exist_ok=True)  # figures the notebooks' prose shows
    from mmrlhf.report import example_inputs, write_report
    runs, comparisons, rewardbench = example_inputs()
    write_report(out / "example-report.html", runs, comparisons, rewardbench, title="mmrlhf example report (made-up numbers)")
    written.append(out / "example-report.html")
    return written


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.ids, self.images = [], set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src") and not re.match(r"^(https?:|data:)", a["src"]): self.images.append(a["src"])
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])


def check_links(site: Path) -> list[str]:
    "Broken internal links: a page or an anchor that does not exist."
    parsed = {}
    for p in site.glob("*.html"):
        parser = _Links(); parser.feed(p.read_text(encoding="utf-8")); parsed[p.name] = parser
    bad = []
    for name, parser in parsed.items():
        bad += [f"{name}: image {src!r} is missing" for src in parser.images if not (site / src).is_file()]
        for href in parser.hrefs:
            if re.match(r"^(https?:|mailto:|data:)", href): continue
            target, _, anchor = href.partition("#")
            target = target or name
            if target.endswith(".ipynb"): bad.append(f"{name}: link to a notebook file {href!r} (not part of the site)"); continue
            if target not in parsed: bad.append(f"{name}: {href!r} -> no page {target}"); continue
            if anchor and anchor not in parsed[target].ids: bad.append(f"{name}: {href!r} -> no anchor #{anchor} in {target}")
    return bad


def screenshot(page: Path, png: Path, chromium: str) -> None:
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
                    "--virtual-time-budget=8000", f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=180)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"))
    ap.add_argument("--check", action="store_true", help="build into a temporary folder, check links, take screenshots")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp()) / "_site" if args.check else Path(args.out)
    if out.exists() and not args.check: shutil.rmtree(out)
    written = build(out)
    print(f"{len(written)} pages in {out}")
    if not args.check: return 0
    expected = {f"{n}.html" for n, _ in pages()} | {"example-report.html"}
    missing = expected - {p.name for p in out.glob("*.html")}
    bad = check_links(out) + [f"missing page {m}" for m in sorted(missing)]
    from mmrlhf.report import find_chromium
    chromium = find_chromium()
    if chromium is None: bad.append("no chromium for the screenshots (apt-get install chromium)")
    else:
        for page in ("index.html", "08_dpo.html"):
            png = out / "screenshots" / page.replace(".html", ".png"); png.parent.mkdir(exist_ok=True)
            screenshot(out / page, png, chromium)
            if not png.is_file() or png.stat().st_size < 20_000: bad.append(f"screenshot of {page} is missing or blank")
            else: print(f"screenshot {png} ({png.stat().st_size // 1000} kB)")
    for b in bad: print("ERROR", b, file=sys.stderr)
    print("site check:", "failed" if bad else f"ok ({len(expected)} pages, every internal link resolves)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
