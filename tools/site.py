"""Build the documentation site offline (no Quarto), laid out like an nbdev site.

One HTML page per notebook in notebook order with a sidebar; `#|` directive lines and hidden
cells left out; each exported function or class followed by its signature and parameter table;
formulas typeset by a MathJax copy shipped in the site; the demo's real report; a link, math and
screenshot check.

    .venv/bin/python tools/site.py                 # build _site/
    .venv/bin/python tools/site.py --check         # build into a temporary folder and check it
    .venv/bin/python tools/site.py --demo-run RUN  # refresh bench/results/demo_report, then build
"""
from __future__ import annotations

import argparse, ast, dataclasses, datetime, html, importlib, importlib.util, inspect, io, json
import re, shutil, subprocess, sys, tempfile, time, tokenize, typing
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
DEMO_REPORT = ROOT / "bench" / "results" / "demo_report"  # the demo's report inputs, committed
MATHJAX_JS = "assets/mathjax/tex-svg-full.js"  # MathJax 3: every TeX extension, SVG fonts inside
MATHJAX_PACKAGE = "django-static-mathjax==3.2.2.1"  # the PyPI package whose MathJax is shipped
DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]*)\s*:?\s*(.*?)\s*$")  # any `#|` line
CSS = """
body{margin:0;font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#212529}
nav.sidebar{position:fixed;top:0;left:0;bottom:0;width:230px;overflow:auto;background:#f8f9fa;
 border-right:1px solid #dee2e6;padding:14px 10px;font-size:14px}
nav.sidebar a{display:block;padding:4px 6px;color:#343a40;text-decoration:none;border-radius:4px}
nav.sidebar a:hover{background:#e9ecef}
nav.sidebar a.current{background:#dbe6f5;color:#0d3b78;font-weight:600}
nav.sidebar .brand{font-weight:700;font-size:18px;margin:0 6px 12px}
main.page{margin-left:250px;padding:8px 32px 48px;max-width:1000px}
.jp-InputPrompt,.jp-OutputPrompt{display:none}
.jp-Cell{padding:2px 0}
main.page .jp-InputArea-editor,main.page .jp-OutputArea-output pre{overflow-x:auto}
main.page .jp-RenderedMarkdown pre,main.page .jp-RenderedMarkdown pre code{white-space:pre}
main.page .jp-RenderedMarkdown pre{overflow-x:auto;background:#f6f8fa;padding:8px 12px}
.jp-MarkdownOutput blockquote{border-left:4px solid #dee2e6;color:#6c757d;margin-left:0;
 padding-left:12px}
div.doc{margin:6px 0 22px;padding:0}
div.doc hr{border:0;border-top:1px solid #dee2e6;margin:14px 0 10px}
div.doc h3{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:17px;margin:6px 0}
div.doc pre.sig{background:#f6f8fa;border-left:4px solid #b6c8e3;padding:8px 12px;margin:6px 0;
 font-size:13px;white-space:pre-wrap}
div.doc p.docstring{font-style:italic;margin:6px 0 8px}
div.doc table{border-collapse:collapse;font-size:13px;margin:4px 0}
div.doc td,div.doc th{border-bottom:1px solid #dee2e6;padding:4px 10px;text-align:left;
 vertical-align:top}
div.doc th{border-bottom:2px solid #adb5bd}
section.index ul{columns:3;font-family:ui-monospace,monospace;font-size:13px}
main.page div.doc a,main.page section.index a,main.page .jp-RenderedMarkdown a{color:#0b5cad}
"""
MATHJAX_CONFIG = r"""<script>window.MathJax = {
 tex: {inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']],
       processEscapes: true, tags: 'ams'},
 options: {enableMenu: false, ignoreHtmlClass: 'tex2jax_ignore|jp-OutputArea|doc'},
 svg: {fontCache: 'global'}};</script>"""
TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{{ resources.site_head }}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block rawcell scoped %}{%- if cell.metadata.get('site_html') -%}{{ cell.source }}
{%- else -%}{{ super() }}{%- endif -%}{% endblock rawcell %}
"""


class SiteError(Exception):
    "A site that cannot be built, naming the file and the reason."


# ------------------------------------------------------------------------------------ notebooks
def pages() -> list[tuple[str, Path]]:
    "(page name, notebook) in the sidebar's order: the home page, then the numbered notebooks."
    home = [NBS / "index.ipynb"] if (NBS / "index.ipynb").is_file() else []
    return [(nb.stem, nb) for nb in home + sorted(NBS.glob("[0-9]*.ipynb"))]


def _cells(nb:Path) -> list:
    "The notebook's cells, each with its source as one string."
    try: cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as e:
        raise SiteError(f"{nb}: not a readable notebook ({e})") from None
    for c in cells:
        if isinstance(c.get("source"), list): c["source"] = "".join(c["source"])
    return cells


def title_of(nb:Path) -> str:
    "The notebook's H1 (its file name when it has none)."
    md = next((c["source"] for c in _cells(nb) if c["cell_type"] == "markdown"), "")
    h1 = re.search(r"^# (.+)$", md, re.M)
    return h1.group(1).strip() if h1 else nb.stem


def module_of(nb:Path) -> str|None:
    "The module a notebook exports to (`#| default_exp`), if any."
    for c in _cells(nb):
        if c["cell_type"] != "code": continue
        m = re.search(r"^\s*#\|\s*default_exp\s+(\S+)", c["source"], re.M)
        if m: return m.group(1)
    return None


def page_of(module:str) -> str|None:
    "The name of the page whose notebook exports `module` (`#| default_exp module`)."
    return next((name for name, nb in pages() if module_of(nb) == module), None)


def directives(src:str) -> dict:
    "The cell's `#|` directives: name -> value ('' for a bare flag such as `#| hide`)."
    return {m.group(1): m.group(2) for line in src.splitlines() if (m := DIRECTIVE.match(line))}


def strip_directives(src:str) -> str:
    "The cell's source without its `#|` lines (and without blank lines they leave at the top)."
    return "\n".join(l for l in src.splitlines() if not DIRECTIVE.match(l)).lstrip("\n")


def is_hidden(src:str) -> bool:
    "Whether the site leaves out a code cell: `#| hide`, `#| include: false`, `#| default_exp`."
    d, lines = directives(src), src.strip().splitlines()
    return ("hide" in d or d.get("include", "").lower() == "false"
            or bool(lines and re.match(r"\s*#\|\s*default_exp\b", lines[0])))


def export_kind(src:str) -> tuple[str, str]|None:
    "('export' or 'exports', the target module or '') of a cell exporting public names, else None."
    d = directives(src)
    for k in ("export", "exports"):
        if k in d: return k, d[k].split()[0] if d[k] else ""
    return None


def _patched_owner(node) -> str|None:
    "The class a `@patch` or `@patch_to(Cls)` function is added to."
    for dec in node.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "patch_to" and dec.args:
            return ast.unparse(dec.args[0])
        if getattr(dec, "id", None) == "patch" and node.args.args and node.args.args[0].annotation:
            return ast.unparse(node.args.args[0].annotation).split("|")[0].strip()
    return None


def exported_defs(src:str) -> list[str]:
    "The public names a cell defines at top level by `def` or `class` (`Cls.method` for a patch)."
    try: tree = ast.parse(strip_directives(src))
    except SyntaxError: return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        if node.name.startswith("_"): continue
        owner = _patched_owner(node) if not isinstance(node, ast.ClassDef) else None
        out.append(f"{owner}.{node.name}" if owner else node.name)
    return out


def field_comments(src:str, cls:str) -> dict:
    "The `# comment` after each annotated field of class `cls` in `src` (docments for fields)."
    src = strip_directives(src)
    try: tree = ast.parse(src)
    except SyntaxError: return {}
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError): return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None: return {}
    return {n.target.id: comments[n.lineno] for n in node.body if isinstance(n, ast.AnnAssign)
            and isinstance(n.target, ast.Name) and n.lineno in comments}


# -------------------------------------------------------------------------- per-definition docs
def _anno(a) -> str:
    "An annotation as written (string annotations stay as they are)."
    if a is inspect.Parameter.empty: return ""
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(d) -> str:
    "A default value as code, '' when there is none."
    if d is inspect.Parameter.empty or d is dataclasses.MISSING: return ""
    r = repr(d)
    return r if len(r) <= 60 else r[:57] + "..."


def _lookup(module, dotted:str):
    "The object `dotted` (`name` or `Cls.method`) in `module`, or None."
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None: return None
    return obj


def _rows(obj, src:str, name:str) -> tuple[list, tuple|None]:
    "(parameter rows (name, type, default, details), the return row or None) of `obj`."
    from fastcore.docments import docments
    notes = field_comments(src, name.split(".")[-1]) if inspect.isclass(obj) else {}
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        rows = []
        for f in dataclasses.fields(obj):
            if not f.init: continue
            d = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help") or notes.get(f.name, "")
            rows.append((f.name, _anno(f.type), _default(d), help_))
        return rows, None
    if inspect.isclass(obj) and typing.is_typeddict(obj):
        return [(k, _anno(a), "", notes.get(k, "")) for k, a in obj.__annotations__.items()], None
    try: docs = docments(obj, full=True)
    except Exception: docs = {}
    try: params = inspect.signature(obj).parameters
    except (TypeError, ValueError): params = {}
    rows = []
    for k, p in params.items():
        star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        details = (docs.get(k) or {}).get("docment") or ""
        rows.append((star + k, _anno(p.annotation), _default(p.default), details))
    ret = docs.get("return") or {}
    anno, details = _anno(ret.get("anno", inspect.Parameter.empty)), ret.get("docment") or ""
    return rows, (("**Returns**", anno, "", details) if anno or details else None)


def signature_text(obj, name:str) -> str:
    "`name(param:type=default, ...) -> type`, wrapped under 100 characters."
    if inspect.isclass(obj) and typing.is_typeddict(obj):
        parts, ret = [f"{k}:{_anno(a)}" for k, a in obj.__annotations__.items()], ""
    else:
        try: sig = inspect.signature(obj)
        except (TypeError, ValueError): return f"{name}(...)"
        parts, prev, params = [], None, list(sig.parameters.values())
        if params and params[0].name in ("self", "cls"): params = params[1:]  # as nbdev shows it
        for p in params:
            if prev is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY: parts.append("/")
            if p.kind is p.KEYWORD_ONLY and prev not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
                parts.append("*")
            star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
            a, d = _anno(p.annotation), _default(p.default)
            parts.append(star + p.name + (f":{a}" if a else "") + (f"={d}" if d else ""))
            prev = p.kind
        if prev is inspect.Parameter.POSITIONAL_ONLY: parts.append("/")
        ra = "" if inspect.isclass(obj) else _anno(sig.return_annotation)
        ret = f" -> {ra}" if ra else ""
    one = f"{name}({', '.join(parts)}){ret}"
    if len(one) <= 96: return one
    lines = [""]
    for p in parts:  # whole parameters per line, as many as fit
        if lines[-1] and len(lines[-1]) + len(p) > 86: lines.append("")
        lines[-1] += p + ", "
    body = "\n".join("    " + l.rstrip(", ") + "," for l in lines).rstrip(",")
    return f"{name}(\n{body}\n){ret}"


def _inline_code(text:str) -> str:
    "Escaped text with its `backticked` parts as <code>."
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def doc_html(obj, name:str, src:str="") -> str:
    "nbdev's show_doc for `obj`: its name (the anchor), signature, docstring and parameter table."
    e = html.escape
    rows, back = _rows(obj, src, name)
    out = [f"<div class='doc' id='{e(name)}'><hr><h3>{e(name)}</h3>",
           f"<pre class='sig'>{e(signature_text(obj, name))}</pre>"]
    doc = (inspect.getdoc(obj) or "").strip()
    if inspect.isclass(obj) and doc == (inspect.getdoc(dict) or "").strip(): doc = ""
    if doc: out.append(f"<p class='docstring'>{_inline_code(doc)}</p>")
    rows = [r for r in rows if r[0] not in ("self", "cls")] + ([back] if back else [])
    if rows:
        out.append("<table><thead><tr><th></th><th>Type</th><th>Default</th><th>Details</th>"
                   "</tr></thead><tbody>")
        for k, a, d, details in rows:
            k = "<strong>Returns</strong>" if k == "**Returns**" else e(k)
            a, d = (f"<code>{e(x)}</code>" if x else "" for x in (a, d))
            out.append(f"<tr><td>{k}</td><td>{a}</td><td>{d}</td>"
                       f"<td>{_inline_code(details)}</td></tr>")
        out.append("</tbody></table>")
    return "\n".join(out) + "</div>"


def _import(module:str):
    "`mmrlhf.<module>`, or SiteError naming the module."
    try: return importlib.import_module(f"mmrlhf.{module}")
    except Exception as e:
        raise SiteError(f"mmrlhf.{module}: cannot be imported ({type(e).__name__}: {e})") from None


# -------------------------------------------------------------------------------- building pages
def _without_widgets(o):
    "An output without its widget view (nothing draws it offline); None when nothing else is left."
    data = o.get("data")
    if not data or "application/vnd.jupyter.widget-view+json" not in data: return o
    data.pop("application/vnd.jupyter.widget-view+json")
    return o if data else None


def site_cells(nb:Path) -> tuple[list, list[str], list[str]]:
    "(the cells the page shows, documented names in page order, problems) for notebook `nb`."
    import nbformat
    book = nbformat.read(str(nb), as_version=4)
    default, cells, names, problems, modules = module_of(nb), [], [], [], {}
    for c in book.cells:
        if c.cell_type != "code": cells.append(c); continue
        if is_hidden(c.source): continue
        src = c.source
        d, kind = directives(src), export_kind(src)
        c.source = strip_directives(src)
        if d.get("echo", "").lower() == "false":
            c.metadata.setdefault("transient", {})["remove_source"] = True
        if d.get("output", "").lower() == "false": c.outputs = []
        c.outputs = [o for o in map(_without_widgets, c.outputs) if o is not None]
        if c.source.strip() or c.outputs: cells.append(c)
        defs = exported_defs(src) if kind else []
        if not defs: continue
        target = kind[1] or default
        if target is None:
            problems.append(f"{nb.name}: a cell exports but the notebook has no `#| default_exp`")
            continue
        if target not in modules:
            try: modules[target] = _import(target)
            except SiteError as e: problems.append(f"{nb.name}: {e}"); modules[target] = None
        if modules[target] is None: continue
        docs = []
        for name in defs:
            obj = _lookup(modules[target], name)
            if obj is None:
                problems.append(f"{nb.name}: `{name}` is not in mmrlhf.{target} "
                                "(run nbdev_export)")
                continue
            docs.append(doc_html(obj, name, src)); names.append(name)
        if docs:
            cells.append(nbformat.v4.new_raw_cell("\n".join(docs), metadata={"site_html": True}))
    return cells, names, problems


def symbols() -> dict:
    "Each documented name -> the page that documents it, from every notebook's exporting cells."
    out = {}
    for name, nb in pages():
        for c in _cells(nb):
            src = c["source"]
            if c["cell_type"] == "code" and export_kind(src) and not is_hidden(src):
                for s in exported_defs(src): out.setdefault(s, name)
    return out


def _link_symbols(body:str, current:str, syms:dict) -> str:
    "`name` in prose linked to its documentation, as nbdev does (code inside a link is left)."
    def sub(m):
        if m.group(1) or m.group(3) not in syms: return m.group(0)
        page = syms[m.group(3)]
        href = ("" if page == current else f"{page}.html") + f"#{m.group(3)}"
        return f"<a href='{html.escape(href)}'>{m.group(2)}</a>"
    pattern = r"(<a\b[^>]*>.*?</a>)|(<code>([A-Za-z_][\w.]*)(?:\(\))?</code>)"
    return re.sub(pattern, sub, body, flags=re.S)


def _notebook_links(body:str, known:set) -> str:
    "Links to a notebook of the site (`12_dpo.ipynb#x`) pointed at its page, as nbdev does."
    def sub(m):
        stem = m.group(2)[:-len(".ipynb")]
        return f"{m.group(1)}{stem}.html{m.group(3)}" if stem in known else m.group(0)
    return re.sub(r"""(href=["'])([^"'#:/]+\.ipynb)((?:#[^"']*)?["'])""", sub, body)


def _exporter():
    "nbconvert's lab template with the site's blocks: no CDN script, the shipped MathJax."
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name="lab", template_file="site.html.j2",
                        extra_loaders=[DictLoader({"site.html.j2": TEMPLATE})],
                        exclude_input_prompt=True, exclude_output_prompt=True)


def sidebar(current:str, entries:list) -> str:
    "The navigation: the pages in notebook order, then the demo's report."
    mark = lambda n: " class=current" if n == current else ""
    links = "".join(f"<a href='{n}.html'{mark(n)}>{html.escape(t)}</a>" for n, t in entries)
    return (f"<nav class='sidebar'><div class='brand'>mmrlhf</div>{links}"
            f"<a href='demo-report.html'{mark('demo-report')}>Demo report</a></nav>")


def index_html(module:str, documented:list) -> str:
    "A closing index of the page's documented names, each linked to its entry."
    e = html.escape
    items = "".join(f"<li><a href='#{e(n)}'>{e(n)}</a></li>" for n in documented)
    return (f"<section class='index' id='index'><h2>Index: <code>mmrlhf.{e(module)}</code></h2>"
            f"<ul>{items}</ul></section>")


def _wrap(body:str, current:str, entries:list, extra:str="") -> str:
    "The page inside the site's frame: its CSS, the sidebar and a <main>."
    body = body.replace("</head>", f"<style>{CSS}</style></head>", 1)
    body = re.sub(r"<body([^>]*)>", lambda m: f"<body{m.group(1)}>{sidebar(current, entries)}"
                  "<main class='page'>", body, count=1)
    return body.replace("</body>", f"{extra}</main></body>", 1)


def build_page(nb:Path, name:str, entries:list, syms:dict|None=None,
               exporter=None) -> tuple[str, list]:
    "(the page of notebook `nb` as HTML, problems)."
    import nbformat
    cells, documented, problems = site_cells(nb)
    meta = nbformat.read(str(nb), as_version=4).metadata
    meta.pop("widgets", None)  # widget state: nothing draws it offline
    book = nbformat.v4.new_notebook(cells=cells, metadata=meta)
    title = dict(entries).get(name, name)
    head = f"{MATHJAX_CONFIG}<script defer src='{MATHJAX_JS}'></script>"
    body, _ = (exporter or _exporter()).from_notebook_node(
        book, resources={"metadata": {"name": f"mmrlhf - {title}"}, "site_head": head})
    body = re.sub(r"<script\b[^>]*\bsrc=['\"]https?://[^>]*>\s*</script>", "", body)  # no CDN
    if "Plotly.newPlot" in body:
        from plotly.offline import get_plotlyjs
        body = body.replace("</head>", f"<script>{get_plotlyjs()}</script></head>", 1)
    body = _notebook_links(body, {n for n, _ in entries})
    if syms: body = _link_symbols(body, name, syms)
    mod = module_of(nb)
    extra = index_html(mod, documented) if mod and documented else ""
    return _wrap(body, name, entries, extra), problems


def mathjax_source() -> Path:
    "The MathJax bundle in the installed package, or SiteError saying which package to install."
    spec = importlib.util.find_spec("mathjax")
    es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
    js = es5 / Path(MATHJAX_JS).name if es5 else None
    if js is None or not js.is_file():
        raise SiteError(f"MathJax's {Path(MATHJAX_JS).name} not found: install the dev "
                        f"requirement {MATHJAX_PACKAGE}")
    return js


def copy_assets(out:Path) -> None:
    "MathJax (and its licence) and the notebooks' images into the site."
    js, dest = mathjax_source(), out / MATHJAX_JS
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(js, dest)
    if (js.parents[1] / "LICENSE").is_file(): shutil.copy2(js.parents[1] / "LICENSE", dest.parent)
    if (NBS / "images").is_dir():  # figures the notebooks' prose shows
        shutil.copytree(NBS / "images", out / "images", dirs_exist_ok=True)


# ----------------------------------------------------------------------------------- demo report
DEMO_FILES = {"eval/before/run.json": "before.json", "eval/after/run.json": "after.json",
              "eval/after/comparison.json": "comparison.json",
              "reward/rewardbench.json": "rewardbench.json"}  # in the run folder -> committed as


def _head_commit() -> str|None:
    "The checkout's commit (short), None outside git."
    try: return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError): return None


def refresh_demo_report(run:Path, dest:Path=DEMO_REPORT, commit:str|None=None) -> Path:
    "Copy the report inputs of a finished `mmrlhf demo` run folder into `dest`, with their origin."
    run = Path(run)
    missing = [src for src in DEMO_FILES if not (run / src).is_file()]
    if missing:
        raise SiteError(f"{run}: not a finished `mmrlhf demo` run folder "
                        f"(missing {', '.join(missing)})")
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in DEMO_FILES.items(): shutil.copyfile(run / src, dest / name)
    summary = run / "summary.json"
    summary = json.loads(summary.read_text()) if summary.is_file() else {}
    mtime = (run / "eval" / "after" / "comparison.json").stat().st_mtime
    when = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).date().isoformat()
    config = run / "config.yaml"
    if config.is_file():  # the run's settings, less its run folder
        kept = [l for l in config.read_text().splitlines() if not l.startswith("out:")]
        (dest / "config.yaml").write_text("\n".join(kept) + "\n")
    source = {"command": "mmrlhf demo" + (" --config config.yaml" if config.is_file() else ""),
              "date": when, "commit": commit or _head_commit(), "seconds": summary.get("seconds"),
              "run_folder": str(run), "files": {name: src for src, name in DEMO_FILES.items()},
              "refresh": "mmrlhf demo --out RUN; .venv/bin/python tools/site.py --demo-run RUN"}
    (dest / "source.json").write_text(json.dumps(source, indent=1) + "\n")
    return dest


def demo_report(out:Path, inputs:Path=DEMO_REPORT) -> Path:
    "The demo's report page, written by `mmrlhf.report.write_report` from the committed inputs."
    from mmrlhf.report import check_comparison, check_rewardbench, check_run, write_report
    files = ["before.json", "after.json", "comparison.json", "rewardbench.json", "source.json"]
    missing = [f for f in files if not (inputs / f).is_file()]
    if missing:
        raise SiteError(f"{inputs}: missing {', '.join(missing)}; refresh it from a demo run: "
                        "`mmrlhf demo --out RUN`, then "
                        "`.venv/bin/python tools/site.py --demo-run RUN`")
    def read(f):
        try: return json.loads((inputs / f).read_text(encoding="utf-8"))
        except ValueError as e: raise SiteError(f"{inputs / f}: invalid JSON ({e})") from None
    runs = [check_run(read(f), str(inputs / f)) for f in ("before.json", "after.json")]
    comparisons = [check_comparison(read("comparison.json"), str(inputs / "comparison.json"))]
    rewardbench = check_rewardbench(read("rewardbench.json"), str(inputs / "rewardbench.json"))
    src = read("source.json")
    title = f"mmrlhf demo report: {src['command']}, run on {src['date']}"
    if src.get("commit"): title += f" at commit {src['commit']}"
    return write_report(out / "demo-report.html", runs, comparisons, rewardbench, title=title)


def build(out:Path, only:list|None=None) -> tuple[list[Path], list[str]]:
    "Write the site (or only the pages named in `only`) into `out`; return (the pages, problems)."
    out.mkdir(parents=True, exist_ok=True)
    copy_assets(out)
    all_pages = pages()
    entries = [(name, title_of(nb)) for name, nb in all_pages]
    syms, exporter, written, problems = symbols(), _exporter(), [], []
    for name, nb in all_pages:
        if only is not None and name not in only: continue
        body, bad = build_page(nb, name, entries, syms, exporter)
        (out / f"{name}.html").write_text(body, encoding="utf-8")
        written.append(out / f"{name}.html"); problems += bad
    if only is None or "demo-report" in only:
        page = Path(demo_report(out))
        framed = _wrap(page.read_text(encoding="utf-8"), "demo-report", entries)
        page.write_text(framed, encoding="utf-8")
        written.append(page)
    return written, problems


# -------------------------------------------------------------------------------------- checking
class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.ids, self.images, self.remote = [], set(), [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src") and not re.match(r"^(https?:|data:)", a["src"]):
            self.images.append(a["src"])
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])
        for k in ("src", "href"):
            remote = re.match(r"^(https?:)?//", a.get(k) or "")
            if tag in ("script", "link", "img", "iframe") and remote:
                self.remote.append(f"<{tag} {k}={a[k]!r}>")


def check_links(site:Path) -> list[str]:
    "Broken internal links (a missing page or anchor) and anything the pages load from the web."
    parsed = {}
    for p in site.glob("*.html"):
        parser = _Links(); parser.feed(p.read_text(encoding="utf-8")); parsed[p.name] = parser
    bad = []
    for name, parser in parsed.items():
        bad += [f"{name}: image {s!r} is missing" for s in parser.images
                if not (site / s).is_file()]
        bad += [f"{name}: loads {r} from the web (the site must work offline)"
                for r in parser.remote]
        for href in parser.hrefs:
            if re.match(r"^(https?:|mailto:|data:)", href): continue
            target, _, anchor = href.partition("#")
            target = target or name
            if target.endswith(".ipynb"):
                bad.append(f"{name}: link to a notebook file {href!r} (not part of the site)")
                continue
            if target not in parsed: bad.append(f"{name}: {href!r} -> no page {target}"); continue
            if anchor and anchor not in parsed[target].ids:
                bad.append(f"{name}: {href!r} -> no anchor #{anchor} in {target}")
    return bad


def has_math(nb:Path) -> bool:
    "Whether the notebook's prose has a `$...$` or `$$...$$` formula."
    return any(c["cell_type"] == "markdown" and re.search(r"\$[^$\s][^$]*\$", c["source"])
               for c in _cells(nb))


def browser():
    "A headless Chromium driven by selenium, or SiteError saying what is missing."
    from mmrlhf.report import find_chromium
    chromium, driver = find_chromium(), shutil.which("chromedriver")
    if not chromium or not driver:
        raise SiteError("headless Chromium and chromedriver are needed "
                        "(Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions(); opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def math_census(driver, page:Path, timeout:float=30) -> dict:
    "{'loaded', 'formulas': typeset, 'errors': failed to typeset} once MathJax is done on `page`."
    driver.get(page.as_uri())
    done = ("if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return null;"
            "MathJax.startup.promise.then(() => { window.__mjdone = true; });"
            "return window.__mjdone === true;")
    end = time.time() + timeout
    while time.time() < end and driver.execute_script(done) is not True: time.sleep(0.2)
    return driver.execute_script(
        "return {loaded: window.__mjdone === true,"
        " formulas: document.querySelectorAll('mjx-container').length,"
        " errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length}")


def check_math(site:Path, names:list[str]) -> list[str]:
    "Pages among `names` (notebooks with formulas) whose formulas MathJax did not typeset."
    bad, driver = [], browser()
    try:
        for name in names:
            c = math_census(driver, site / f"{name}.html")
            if not c["loaded"]: bad.append(f"{name}.html: MathJax did not load from {MATHJAX_JS}")
            elif c["formulas"] == 0:
                bad.append(f"{name}.html: formulas in its notebook, none typeset")
            elif c["errors"]: bad.append(f"{name}.html: {c['errors']} formulas failed to typeset")
            else: print(f"math {name}.html: {c['formulas']} formulas typeset")
    finally: driver.quit()
    return bad


def screenshot(page:Path, png:Path, chromium:str) -> None:
    "A 1280x900 PNG of `page` in headless Chromium."
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=8000",
                    f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=180)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="the folder to build into")
    ap.add_argument("--check", action="store_true", help="build into a temporary folder; check "
                    "links, math and that nothing loads from the web; take screenshots")
    ap.add_argument("--demo-run", metavar="RUN", help="first copy the report inputs of a finished "
                    f"`mmrlhf demo --out RUN` into {DEMO_REPORT.relative_to(ROOT)}")
    ap.add_argument("--demo-commit", help="the commit the demo run was made on (default: HEAD)")
    args = ap.parse_args(argv)
    try:
        if args.demo_run:
            dest = refresh_demo_report(Path(args.demo_run), commit=args.demo_commit)
            print("demo report inputs in", dest)
        out = Path(tempfile.mkdtemp()) / "_site" if args.check else Path(args.out)
        if out.exists() and not args.check: shutil.rmtree(out)
        written, bad = build(out)
    except SiteError as e:
        print("ERROR", e, file=sys.stderr); return 1
    print(f"{len(written)} pages in {out}")
    if not args.check:
        for b in bad: print("ERROR", b, file=sys.stderr)
        return 1 if bad else 0
    expected = {f"{n}.html" for n, _ in pages()} | {"demo-report.html"}
    missing = expected - {p.name for p in out.glob("*.html")}
    bad += check_links(out) + [f"missing page {m}" for m in sorted(missing)]
    try: bad += check_math(out, [n for n, nb in pages() if has_math(nb)])
    except SiteError as e: bad.append(str(e))
    from mmrlhf.report import find_chromium
    chromium = find_chromium()
    if chromium is None: bad.append("no chromium for the screenshots (apt-get install chromium)")
    else:
        for name in ["index", page_of("dpo") or pages()[-1][0], "demo-report"]:
            png = out / "screenshots" / f"{name}.png"; png.parent.mkdir(exist_ok=True)
            screenshot(out / f"{name}.html", png, chromium)
            if not png.is_file() or png.stat().st_size < 20_000:
                bad.append(f"screenshot of {name}.html is missing or blank")
            else: print(f"screenshot {png} ({png.stat().st_size // 1000} kB)")
    for b in bad: print("ERROR", b, file=sys.stderr)
    print("site check:", "failed" if bad else f"ok ({len(expected)} pages, every internal link "
          "resolves, formulas typeset, nothing loaded from the web)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
