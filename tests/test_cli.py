"The `mmrlhf` command as a user runs it: help, version, YAML plus overrides, clear errors."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

import mmrlhf
from mmrlhf.cli import COMMANDS, command_function

EXE = shutil.which("mmrlhf", path=str(Path(sys.executable).parent)) or shutil.which("mmrlhf")


def run(*args, cwd=None):
    assert EXE, "the mmrlhf console script is not installed"
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mmrlhf {mmrlhf.__version__}"


@pytest.mark.parametrize("command, field", [("synth", "--n-queries"), ("demo", "--warmup-steps")])
def test_help_lists_each_setting(command, field):
    r = run(command, "--help")
    assert r.returncode == 0 and field in r.stdout
    assert "--config" in r.stdout and "KEY=VALUE" in r.stdout


def test_top_level_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "synth" in r.stdout and "demo" in r.stdout


def test_yaml_then_flags_then_overrides(tmp_path):
    (tmp_path / "world.yaml").write_text("n_queries: 50\nseed: 4\nk: 3\n")
    r = run("synth", "--config", "world.yaml", "--n-queries", "7", "k=2", "--out", "w",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "w" / "queries.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(len(json.loads(l)["responses"]) == 2 for l in lines)
    assert json.loads(lines[0])["id"].startswith("shapes-4-")
    saved = (tmp_path / "w" / "synth-config.yaml").read_text()
    assert "n_queries: 7" in saved and "k: 2" in saved


@pytest.mark.parametrize("args, message", [
    (["synth", "n_querys=5"], "unknown setting 'n_querys'"),
    (["synth", "--k", "two"], "k:"),
    (["synth", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["synth", "seed"], "expected KEY=VALUE"),
])
def test_bad_settings_exit_2_with_a_message(tmp_path, args, message):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("n_queries: 5\nimage_sise: 32\n")
    r = run("synth", "--config", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "bad.yaml: unknown setting 'image_sise'" in r.stderr


def test_demo_end_to_end_tiny(tmp_path):
    args = ["demo", "--out", "d", "size=tiny", "n_pool=40", "n_curated=20", "n_test=10",
            "vision_steps=2", "warmup_steps=4", "batch_size=4", "reward_steps=2",
            "critique_tokens=6", "dpo_steps=2", "max_new_tokens=8"]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "d"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) == {"world", "curate", "sft", "respond", "annotate", "reward",
                                       "ref-logps", "dpo", "evaluate"}
    assert len(summary["policy"]["accuracy"]["before"]) == 3
    assert len(summary["reward_model"]["acc"]) == 3
    assert (out / "dpo" / "final" / "model.safetensors").exists()
    assert (out / "report.html").stat().st_size > 1_000_000
    lines = (out / "respond" / "queries.jsonl").read_text().splitlines()
    responded = [json.loads(l) for l in lines]
    # the world's 4 responses + the policy's
    assert all(len(q["responses"]) == 5 and q["responses"][-1]["model"].endswith("sft")
               for q in responded)
    (out / "dpo" / "done.json").unlink()  # as if it had stopped during MM-DPO: redo only that
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("done in an earlier run") == 8, r.stdout[-2000:]
    # the same seed from scratch in another folder: the same numbers, bit for bit
    again = run(*[a if a != "d" else "e" for a in args], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    second = json.loads((tmp_path / "e" / "summary.json").read_text())
    untimed = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "total_seconds")}
    assert untimed(second) == untimed(summary)
    for f in ("scored-test/queries.jsonl", "eval/after/predictions.jsonl",
              "dpo/final/model.safetensors"):
        assert (tmp_path / "e" / f).read_bytes() == (out / f).read_bytes(), f
    def unnamed(path):  # the policy's answers are named by its folder, which differs
        recs = [json.loads(l) for l in path.read_text().splitlines()]
        for q in recs:
            for r in q["responses"]: r.pop("model")
        return recs
    assert unnamed(tmp_path / "e" / "ref/queries.jsonl") == unnamed(out / "ref/queries.jsonl")
    # the ablations on the first run: one seed, a 1 x 1 grid
    r = run("ablate", "run=d", "seeds=[0]", "grid_w=[0.5]", "grid_k=[1.0]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "ablate" / "results.json").read_text())
    assert set(res) == {"reward", "beta", "grid"}
    assert [t["variant"] for t in res["beta"]["tests"]] == ["dynamic"] * 2 + ["implicit"] * 2
    assert "critique vs scalar" in r.stdout and "fixed β:" in r.stdout


@pytest.mark.parametrize("command", ["synth", "demo"])
def test_shipped_configs_load(command):
    root = Path(__file__).resolve().parents[1]
    r = run(command, "--config", str(root / "configs" / f"{command}.yaml"), "--print-config")
    assert r.returncode == 0, r.stderr
    assert "out:" in r.stdout


# ---------------------------------------------------------------- the fast CLI contract

HEAVY = ("torch", "transformers", "datasets", "faiss", "open_clip", "fastapi")
LOADED = ("import contextlib, io, sys\n"
          "from mmrlhf.cli import main\n"
          "with contextlib.redirect_stdout(io.StringIO()):\n"
          "    try: main(sys.argv[1:])\n"
          "    except SystemExit: pass\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))")


def heavy_modules_after(*argv):
    "The heavy modules a fresh interpreter has loaded after `main(argv)`."
    code = LOADED.format(heavy=set(HEAVY))
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_every_command_is_listed_and_help_is_light():
    r = run("--help")
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS)
    assert heavy_modules_after("--help") == "[]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_imports_no_heavy_module(command):
    assert heavy_modules_after(command, "--help") == "[]"


def test_the_light_check_sees_a_heavy_import():
    "The check above can fail: after a stage's module is imported, it reports torch."
    code = LOADED.format(heavy=set(HEAVY)).replace("import main", "import main; import mmrlhf.dpo")
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                       timeout=300)
    assert "'torch'" in r.stdout and "'transformers'" in r.stdout, r.stderr[-2000:]


def test_every_command_resolves_to_a_function_of_its_config():
    import inspect, typing
    for name, (cls, target, _) in COMMANDS.items():
        fn = command_function(name)
        assert callable(fn) and f"{fn.__module__}:{fn.__name__}" == f"mmrlhf.{target}", name
        required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
        assert len(required) == 1, f"{name}: {target} must take just its config, takes {required}"
        hint = typing.get_type_hints(fn)[required[0].name]
        assert hint is cls, f"{name}: {target} takes {hint}, not {cls.__name__}"
