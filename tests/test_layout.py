"The house's layout, computed from the code: modules in data-flow order, no cycles, the fixtures on the roof, a light CLI."
import ast, json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOF = {"world", "testbed", "pipeline"}   # the shapes world, tiny models and the demo: imported by no real module


def notebook_order() -> list[str]:
    "Modules in the order of the notebooks that export them."
    order = []
    for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            m = re.search(r"#\|\s*default_exp\s+(\w+)", "".join(cell["source"]))
            if m: order.append(m.group(1)); break
    return order


def imports_of(module: str) -> list[tuple[str, str, bool]]:
    "(imported module, name, at the module's top level) for every import of a sibling module."
    tree = ast.parse((ROOT / "mmrlhf" / f"{module}.py").read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: target = mod
            elif mod.startswith("mmrlhf."): target = mod.split(".", 1)[1]
            else: continue
            out += [(target, a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".", 1)[1], "*", id(node) in top) for a in node.names if a.name.startswith("mmrlhf.")]
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m)} for m in notebook_order()}


def test_every_module_comes_from_one_notebook():
    order = notebook_order()
    on_disk = {p.stem for p in (ROOT / "mmrlhf").glob("*.py") if not p.stem.startswith("_")}
    assert len(order) == len(set(order)) and set(order) == on_disk, (order, on_disk)


def test_imports_only_point_up_the_house():
    "Each module imports only modules of earlier notebooks: no cycles, data-flow order."
    order = notebook_order()
    upward = [(m, t) for m, ts in graph().items() for t in ts if order.index(t) >= order.index(m)]
    assert upward == [], upward


def test_no_real_module_reaches_the_roof():
    "The shapes world, the test bed and the demo are found by real modules only through plug-in names."
    real = [m for m in notebook_order() if m not in ROOF and m != "cli"]
    g = graph()
    assert [(m, t) for m in real for t in g[m] if t in ROOF] == []
    assert g["cli"] & ROOF == set()


def test_no_private_names_or_late_imports_across_modules():
    bad = [(m, t, n) for m in notebook_order() for t, n, top in imports_of(m) if n.startswith("_") or not top]
    assert bad == [], bad


def test_the_graph_check_can_fail(tmp_path):
    "The checks above see an import inside a function and a private name."
    src = "from .core import opt\ndef f():\n    from mmrlhf.world import _secret\n"
    tree = ast.parse(src)
    top = {id(n) for n in tree.body}
    found = [(n.module, a.name, id(n) in top) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert ("mmrlhf.world", "_secret", False) in found


def test_the_readme_map_lists_every_room():
    "The README's table of rooms names every module, in notebook order."
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\|\s*`?(\d\d)_(\w+)`?\s*\|\s*`(\w+)`", readme, re.M)
    assert [mod for _, _, mod in rows] == notebook_order(), rows


HEAVY = ("torch", "transformers", "datasets", "faiss", "open_clip", "fastapi", "peft", "accelerate")


def test_configs_module_is_light():
    code = f"import sys, mmrlhf.configs; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_the_readme_map_says_what_each_room_imports():
    "The table's last column is the import graph computed from the code (the roof rooms say 'anything below')."
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\|\s*`\d\d_\w+`\s*\|\s*`(\w+)`\s*\|.*\|\s*([^|]*?)\s*\|\s*$", readme, re.M)
    g, order = graph(), notebook_order()
    assert len(rows) == len(order)
    for module, said in rows:
        if said == "anything below": assert module in ROOF; continue
        named = set() if said == "—" else {s.strip() for s in said.split(",")}
        assert named == g[module], (module, named, g[module])


def test_every_name_of_the_old_layout_still_resolves():
    "Each public name of the previous layout resolves from its old module (moved ones with a warning)."
    import importlib, warnings
    old = json.loads((ROOT / "tests" / "old_layout_names.json").read_text())
    missing, unwarned = [], []
    for module, names in old.items():
        mod = importlib.import_module(f"mmrlhf.{module}")
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try: getattr(mod, name)
                except AttributeError: missing.append(f"{module}.{name}"); continue
            moves = getattr(mod, "__getattr__", None)
            if name not in vars(mod) and moves is not None and not caught: unwarned.append(f"{module}.{name}")
    assert missing == [] and unwarned == [], (missing, unwarned)
