"The offline docs site's link check finds missing pages and anchors (the build itself runs in tools/test.sh)."
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("site_tool", Path(__file__).resolve().parents[1] / "tools" / "site.py")
site = importlib.util.module_from_spec(spec); spec.loader.exec_module(site)


def test_link_check_finds_broken_links(tmp_path):
    (tmp_path / "a.html").write_text("<a href='b.html#x'>ok</a><a href='c.html'>no page</a><a href='b.html#nope'>no anchor</a>"
                                     "<a href='https://example.org'>external</a><a href='00_core.ipynb'>a notebook</a>")
    (tmp_path / "b.html").write_text("<h2 id='x'>x</h2><a href='#x'>self</a>")
    bad = site.check_links(tmp_path)
    assert len(bad) == 3 and any("no page c.html" in b for b in bad) and any("#nope" in b for b in bad) and any("notebook" in b for b in bad)


def test_pages_follow_notebook_order_and_have_titles():
    names = [n for n, _ in site.pages()]
    assert names[0] == "index" and names[1:] == sorted(names[1:]) and "08_dpo" in names
    assert site.module_of(site.NBS / "08_dpo.ipynb") == "dpo" and site.title_of(site.NBS / "08_dpo.ipynb") == "dpo"
    api = site.api_html("dpo")
    assert "mmdpo_loss" in api and "β_ori" in api  # signature and a docments row
