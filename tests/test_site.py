"The docs site: nbdev's layout (no directives or hidden cells, docs after each def), math, report."
import html, importlib.util, json, os, re, shutil
from html.parser import HTMLParser
from pathlib import Path

import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("site_tool", ROOT / "tools" / "site.py")
site = importlib.util.module_from_spec(spec); spec.loader.exec_module(site)


def _notebook_exporting(module:str) -> Path:
    "The notebook with `#| default_exp module`, found by reading every numbered notebook's JSON."
    hits = [nb for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
            if re.search(rf'#\|\s*default_exp\s+{module}(\\n|")', nb.read_text())]
    assert len(hits) == 1, f"expected one notebook exporting {module}, found {hits}"
    return hits[0]


def _sources(nb:Path) -> list:
    "(cell type, source) of each cell."
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(nb.read_text())["cells"]]


class _Blocks(HTMLParser):
    "The page's top-level blocks in <main>, in order: ('cell', its text) or ('doc', its id)."
    def __init__(self):
        super().__init__(); self.blocks, self.main, self.cur = [], None, None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "main": self.main = 0; return
        if self.main is None or tag != "div": return
        self.main += 1
        if self.main == 1:
            cls = a.get("class") or ""
            self.cur = ["doc", a.get("id"), ""] if "doc" in cls.split() else ["cell", None, ""]
            self.blocks.append(self.cur)
    def handle_endtag(self, tag):
        if self.main is not None and tag == "div": self.main -= 1
    def handle_data(self, data):
        if self.cur is not None and self.main: self.cur[2] += data


def _blocks(page:str) -> list:
    p = _Blocks(); p.feed(page); return p.blocks


def text(fragment:str) -> str:
    "An HTML fragment's text."
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def _code_text(page:str) -> str:
    "The text of the page's code cells' inputs (tags stripped)."
    chunks = re.findall(r'<div class="highlight[^"]*"><pre>(.*?)</pre>', page, re.S)
    return "\n".join(html.unescape(re.sub(r"<[^>]+>", "", c)) for c in chunks)


@pytest.fixture(scope="module")
def dpo_site(tmp_path_factory):
    "The page of the notebook exporting `dpo`, built alone (with the site's assets)."
    out = tmp_path_factory.mktemp("site")
    name = site.page_of("dpo")
    written, problems = site.build(out, only=[name])
    assert problems == [], problems
    return out, name, (out / f"{name}.html").read_text(encoding="utf-8")


def test_link_check_finds_broken_links_and_remote_scripts(tmp_path):
    (tmp_path / "a.html").write_text(
        "<a href='b.html#x'>ok</a><a href='c.html'>no page</a><a href='b.html#nope'>no anchor</a>"
        "<a href='https://example.org'>external</a><a href='00_core.ipynb'>a notebook</a>"
        "<script src='https://cdn.example.org/mathjax.js'></script>"
        "<script src='local.js'></script>")
    (tmp_path / "b.html").write_text(
        "<h2 id='x'>x</h2><a href='#x'>self</a>"
        "<link rel=stylesheet href='//cdn.example.org/a.css'>")
    bad = site.check_links(tmp_path)
    assert len(bad) == 5, bad
    assert any("no page c.html" in b for b in bad) and any("#nope" in b for b in bad)
    assert any("notebook" in b for b in bad)
    assert sum("from the web" in b for b in bad) == 2


def test_pages_follow_notebook_order_and_are_found_by_module():
    names = [n for n, _ in site.pages()]
    numbered = sorted(p.stem for p in (ROOT / "nbs").glob("[0-9]*.ipynb"))
    assert names[0] == "index" and names[1:] == numbered
    nb = _notebook_exporting("dpo")
    assert site.page_of("dpo") == nb.stem and site.module_of(nb) == "dpo"
    md = next(s for t, s in _sources(nb) if t == "markdown")
    assert site.title_of(nb) == re.search(r"^# (.+)$", md, re.M).group(1).strip()


def test_directives_and_hidden_cells_are_left_out(tmp_path):
    "A notebook with every kind of directive: only what nbdev shows reaches the page."
    core = _notebook_exporting("core")
    export = next(s for t, s in _sources(core)
                  if t == "code" and re.match(r"#\|\s*export\s*\n(def|class) ", s))
    name = re.match(r"#\|\s*export\s*\n(?:def|class) (\w+)", export).group(1)
    code = lambda src, out=None: nbformat.v4.new_code_cell(src, outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text=out)] if out else [])
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# synthetic\n\n> a page for the test"),
        code("#| default_exp core\nDEFAULT_EXP_MARKER = 1"),
        code("#| hide\nHIDDEN_MARKER = 2", out="HIDDEN_OUTPUT_MARKER"),
        code("#|include: false\nINCLUDE_FALSE_MARKER = 3"),
        code("#| echo: false\nECHO_FALSE_MARKER = 4", out="ECHOED_OUTPUT_MARKER"),
        code("#| output: false\nOUTPUT_FALSE_CODE = 5", out="SILENCED_OUTPUT_MARKER"),
        code("#| eval: false\nSHOWN_MARKER = 6\n#| another_directive: later in the cell"),
        code(export),
        nbformat.v4.new_markdown_cell("after the definition"),
    ])
    path = tmp_path / "99_synthetic.ipynb"; nbformat.write(nb, str(path))
    page, problems = site.build_page(path, path.stem, [(path.stem, "synthetic")])
    assert problems == []
    for absent in ("DEFAULT_EXP_MARKER", "HIDDEN_MARKER", "HIDDEN_OUTPUT_MARKER",
                   "INCLUDE_FALSE_MARKER", "ECHO_FALSE_MARKER", "SILENCED_OUTPUT_MARKER", "#|",
                   "default_exp", "eval: false", "another_directive"):
        assert absent not in page, absent
    for shown in ("ECHOED_OUTPUT_MARKER", "OUTPUT_FALSE_CODE", "SHOWN_MARKER"):
        assert shown in page, shown
    blocks = _blocks(page)
    i = next(i for i, b in enumerate(blocks)
             if b[0] == "cell" and re.search(rf"(def|class) {name}\b", b[2]))
    assert blocks[i + 1][:2] == ["doc", name], blocks[i + 1][:2]
    assert "after the definition" in blocks[i + 2][2]


def test_every_exported_definition_is_followed_by_its_doc(dpo_site):
    out, name, page = dpo_site
    nb = _notebook_exporting("dpo")
    cells = [s for t, s in _sources(nb) if t == "code"]
    exports = [s for s in cells if re.match(r"\s*#\|\s*exports?\b", s) and "#| hide" not in s]
    defined = [(m.group(1), s) for s in exports
               for m in re.finditer(r"^(?:async def|def|class) ([A-Za-z]\w*)", s, re.M)]
    assert defined, "the dpo notebook exports no function or class"
    blocks = _blocks(page)
    for fn, src in defined:
        i = next(i for i, b in enumerate(blocks)
                 if b[0] == "cell" and re.search(rf"^(async def|def|class) {fn}\b", b[2], re.M))
        following = []
        for b in blocks[i + 1:]:
            if b[0] != "doc": break
            following.append(b[1])
        assert fn in following, f"{fn}: not documented right after its cell (found {following})"
    # hidden cells' code is absent: lines that only hidden cells have
    shown = "\n".join(s for s in cells if not re.search(r"#\|\s*hide\b", s))
    hidden = {l.strip() for s in cells if re.search(r"#\|\s*hide\b", s) for l in s.splitlines()}
    code = _code_text(page)
    for line in hidden - {l.strip() for l in shown.splitlines()}:
        if len(line) > 12 and not line.startswith("#"):
            assert line not in code, f"hidden line shown: {line}"
    assert "#|" not in code


def test_parameter_table_has_the_notebooks_docments(dpo_site):
    "Each `name:type=default, # comment` parameter of an exported function is a row of its table."
    out, name, page = dpo_site
    nb = _notebook_exporting("dpo")
    checked = 0
    for t, s in _sources(nb):
        if t != "code" or not re.match(r"\s*#\|\s*export\b", s): continue
        for m in re.finditer(r"^def ([A-Za-z]\w*)\((.*?)\)\s*(?:->[^:]*)?:\s*\n", s, re.M | re.S):
            doc = re.search(rf"<div class=\"doc\" id=\"{m.group(1)}\">(.*?)</table>", page, re.S)
            assert doc, f"{m.group(1)}: no doc block with a parameter table"
            cell = r"<td>(.*?)</td>"
            found = re.findall(f"<tr>{cell * 4}</tr>", doc.group(1), re.S)
            rows = [[text(x) for x in r] for r in found]
            # one parameter on a line, then its comment: `name:type=default, # comment`
            one = r"^\s*(?:def \w+\()?(\w+)\s*(?::[^=,#\n]*)?(?:=[^,#\n]*)?,?\s*#\s*(.+)$"
            for p, comment in re.findall(one, m.group(2), re.M):
                row = next((r for r in rows if r[0] == p), None)
                assert row, f"{m.group(1)}: no row for parameter {p}"
                assert row[3] == comment.strip().replace("`", ""), (m.group(1), p, row)
                checked += 1
    assert checked >= 5, f"only {checked} documented parameters found in the dpo notebook"


def test_no_cdn_and_math_assets_shipped(dpo_site):
    out, name, page = dpo_site
    srcs = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']([^\"']+)", page)
    remote = [s for s in srcs if re.match(r"^(https?:)?//", s)]
    assert remote == [], remote
    assert not re.search(r"cdnjs|cdn\.jsdelivr|unpkg\.com|mathjax/2\.7", page)
    assert site.MATHJAX_JS in srcs and (out / site.MATHJAX_JS).stat().st_size > 1_000_000
    js = (out / site.MATHJAX_JS).read_text(encoding="utf-8", errors="replace")
    assert "MathJax" in js and "svg" in js.lower()
    assert [b for b in site.check_links(out) if "from the web" in b] == []


def test_formulas_typeset_offline_in_chromium(dpo_site):
    out, name, page = dpo_site
    try: driver = site.browser()
    except site.SiteError as e:
        if os.environ.get("CI"): pytest.fail(str(e))
        pytest.skip(str(e))
    try: census = site.math_census(driver, out / f"{name}.html")
    finally: driver.quit()
    md = "\n".join(s for t, s in _sources(_notebook_exporting("dpo")) if t == "markdown")
    assert census["loaded"] and census["errors"] == 0, census
    assert census["formulas"] >= len(re.findall(r"\$\$.+?\$\$", md, re.S)) + 1, census


def test_demo_report_is_built_from_the_committed_demo_inputs(tmp_path):
    src = json.loads((site.DEMO_REPORT / "source.json").read_text())
    page = site.demo_report(tmp_path).read_text(encoding="utf-8")
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    title = html.unescape(title)
    assert "demo report" in title and src["date"] in title and src["command"] in title
    for f in ("before.json", "after.json"):
        assert html.escape(json.loads((site.DEMO_REPORT / f).read_text())["model"]) in page
    assert "made-up" not in page


def test_refresh_copies_a_demo_runs_report_inputs(tmp_path):
    run = tmp_path / "run"
    for src, name in site.DEMO_FILES.items():
        (run / src).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site.DEMO_REPORT / name, run / src)
    dest = site.refresh_demo_report(run, tmp_path / "inputs")
    for src, name in site.DEMO_FILES.items():
        assert (dest / name).read_bytes() == (run / src).read_bytes()
    assert json.loads((dest / "source.json").read_text())["command"].startswith("mmrlhf demo")
    (run / "reward" / "rewardbench.json").unlink()
    with pytest.raises(site.SiteError, match="rewardbench.json"):
        site.refresh_demo_report(run, tmp_path / "again")
