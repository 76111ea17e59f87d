"Settings: recipes agree with their launchers; every config class is light and round-trips YAML."
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mmrlhf import configs
from mmrlhf.cli import COMMANDS
from mmrlhf.configs import TrainDPOConfig, TrainRewardConfig
from mmrlhf.core import Config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*/*.yaml"))
QUERIES = 30_000  # the paper's curated queries: one epoch
GLOBAL_QUERIES = {"train-reward": 48, "train-dpo": 24}  # about 192 and 96 pairs per step, the release's global batches


def launcher(recipe: Path) -> dict:
    "The accelerate config named in the recipe's launch line, and the command it runs."
    m = re.search(r"accelerate launch --config_file (\S+) -m mmrlhf\.cli (\S+) --config (\S+)", recipe.read_text())
    assert m, f"{recipe}: no launch line"
    assert (ROOT / m.group(3)) == recipe, f"{recipe}: the launch line names {m.group(3)}"
    return {"accelerate": yaml.safe_load((ROOT / m.group(1)).read_text()), "command": m.group(2)}


def test_there_is_a_recipe_per_stage_and_model():
    models = {p.parent.name for p in RECIPES}
    assert models == {"llava_ov_7b", "qwen2_vl_7b", "qwen2_5_vl_7b", "qwen3_vl_8b"}
    for model in models:
        assert {p.stem for p in RECIPES if p.parent.name == model} == {"train-reward", "score", "ref-logps", "train-dpo"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses_and_matches_its_launcher(recipe):
    launch = launcher(recipe)
    assert launch["command"] == recipe.stem
    cls = COMMANDS[recipe.stem][0]
    cfg = cls.from_yaml(recipe)  # unknown keys or wrong types raise
    acc = launch["accelerate"]
    if recipe.stem in GLOBAL_QUERIES:
        world = acc["num_processes"]  # accelerate counts processes over all machines
        assert world * cfg.batch_size * cfg.grad_accum == GLOBAL_QUERIES[recipe.stem]
        assert abs(cfg.steps * GLOBAL_QUERIES[recipe.stem] - QUERIES) / QUERIES < 0.01  # one epoch
        assert cfg.bf16 and cfg.lr == pytest.approx(1e-6)
        ds = json.loads((ROOT / cfg.deepspeed).read_text())
        assert acc["distributed_type"] == "DEEPSPEED" and (ROOT / acc["deepspeed_config"]["deepspeed_config_file"]) == ROOT / cfg.deepspeed
        for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert ds[k] == "auto", f"{cfg.deepspeed}: {k} must be 'auto' so the Trainer fills it from the recipe"
    if recipe.stem == "train-dpo":
        assert (cfg.beta, cfg.w, cfg.k, cfg.gamma, cfg.beta_mode) == (0.1, 0.5, 0.5, 0.25, "dynamic")
    if recipe.stem == "train-reward":
        assert (cfg.critique_weight, cfg.score_weight, cfg.center_weight, cfg.max_length) == (1.0, 1.0, 0.01, 32768)


def test_stages_chain_through_their_outputs():
    for model in ("llava_ov_7b", "qwen2_vl_7b"):
        cfg = {p.stem: yaml.safe_load(p.read_text()) for p in RECIPES if p.parent.name == model}
        assert cfg["score"]["model"] == cfg["train-reward"]["out"] + "/final"
        assert cfg["ref-logps"]["data"] == cfg["score"]["out"] + "/queries.jsonl"
        assert cfg["train-dpo"]["data"] == cfg["ref-logps"]["out"] + "/queries.jsonl"
        assert cfg["train-dpo"]["base"] == cfg["ref-logps"]["model"]  # the reference is the policy's starting point


# ---- the settings module itself: light, complete, and every class round-trips through YAML ----

CONFIG_CLASSES = sorted((c for c in vars(configs).values()
                         if isinstance(c, type) and issubclass(c, Config) and c.__module__ == "mmrlhf.configs"),
                        key=lambda c: c.__name__)


def test_configs_imports_neither_torch_nor_transformers():
    code = ("import json, sys, mmrlhf.configs; heavy = ('torch', 'transformers'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"mmrlhf.configs must stay light (`--help` answers at once), but loads {loaded[:5]}"


def test_every_command_is_configured_in_configs():
    assert {cls for cls, *_ in COMMANDS.values()} <= set(CONFIG_CLASSES)
    assert {"TrainConfig", "TrainRewardConfig", "TrainDPOConfig"} <= {c.__name__ for c in CONFIG_CLASSES}


def _changed(value, tp):
    "Another value of a field's type, to round-trip something other than the default (None: no obvious one)."
    if tp is bool: return not value
    if tp is int: return value + 3
    if tp is float: return value + 0.25
    if tp is str or tp == str | None: return f"{value}-x" if value is not None else "set"
    if tp is list: return [*value, "extra"]
    if tp is dict: return {**value, "extra": 1}
    if tp == int | None: return 7 if value is None else value + 3
    if tp == float | None: return 0.5 if value is None else value + 0.25
    return None


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_config_round_trips_through_yaml(cls, tmp_path):
    cfg = cls()  # every field has a default
    text = cfg.to_yaml()
    # nothing dropped, in order
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(cls)]
    (tmp_path / "defaults.yaml").write_text(text)
    back = cls.from_yaml(tmp_path / "defaults.yaml")
    assert type(back) is cls and back == cfg
    types = typing.get_type_hints(cls)
    other = {f.name: v for f in dataclasses.fields(cls)
             if (v := _changed(getattr(cfg, f.name), types[f.name])) is not None}
    assert other, f"{cls.__name__}: no field to change"
    changed = cls(**other)
    (tmp_path / "changed.yaml").write_text(changed.to_yaml())
    back = cls.from_yaml(tmp_path / "changed.yaml")
    assert back == changed and back != cfg
    assert all(getattr(back, k) == v for k, v in other.items())


def test_training_arguments_follow_the_settings(tmp_path):
    cfg = TrainRewardConfig(out=str(tmp_path / "r"), steps=300, batch_size=2, grad_accum=3)
    args = cfg.training_arguments()
    assert args.max_steps == 300
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 3)
    # reward defaults: lr 2e-3, 5% warm-up, a log every tenth of the steps, a checkpoint every 100
    assert (args.learning_rate, args.warmup_steps) == (2e-3, 15)
    assert (args.logging_steps, args.save_steps) == (30, 100)
    assert args.lr_scheduler_type.value == "cosine"
    assert (args.seed, args.data_seed, args.report_to) == (0, 0, [])
    cfg = TrainDPOConfig(out=str(tmp_path / "d"), steps=40, seed=5)
    args = cfg.training_arguments(save_steps=7)
    assert (args.warmup_steps, args.logging_steps, args.seed, args.save_steps) == (4, 10, 5, 7)
    assert args.output_dir == str(tmp_path / "d")


# every YAML of ours under configs/ (the accelerate ones are accelerate's), with its command
OWN_YAML = {"demo.yaml": "demo", "synth.yaml": "synth",
            "serving/respond-four-models.yaml": "respond", "serving/eval-vllm.yaml": "eval",
            **{str(p.relative_to(ROOT / "configs")): p.stem for p in RECIPES}}


def test_every_yaml_under_configs_loads_into_its_settings():
    found = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.y*ml")}
    assert {f for f in found if not f.startswith("accelerate/")} == set(OWN_YAML)
    for name, command in OWN_YAML.items():
        cls = COMMANDS[command][0]
        cfg = cls.from_yaml(ROOT / "configs" / name)  # unknown keys or wrong types raise
        given = yaml.safe_load((ROOT / "configs" / name).read_text())
        assert {k: getattr(cfg, k) for k in given} == given, name


SERVING = sorted((ROOT / "configs" / "serving").glob("*.yaml"))


@pytest.mark.parametrize("recipe", SERVING, ids=lambda p: p.stem)
def test_serving_recipe_parses_and_its_specs_name_the_served_models(recipe):
    "Each `vllm serve` line's --served-model-name and port appear as an api: spec; every spec is an endpoint."
    from mmrlhf.judge import endpoint_spec
    text = recipe.read_text()
    m = re.search(r"mmrlhf (respond|eval) --config (\S+)", text)
    assert m and (ROOT / m.group(2)) == recipe, f"{recipe}: no run line naming it"
    cfg = COMMANDS[m.group(1)][0].from_yaml(recipe)
    specs = cfg.models if m.group(1) == "respond" else [cfg.model]
    parsed = [endpoint_spec(s) for s in specs]
    assert all(parsed), specs
    served = re.findall(r"vllm serve \S+ --served-model-name (\S+) --host 127\.0\.0\.1 --port (\d+)", text)
    assert served and all((name, f"http://127.0.0.1:{port}/v1") in parsed for name, port in served)
    remote = {base for _, base in parsed if not base.startswith("http://127.0.0.1")}
    assert remote <= set(getattr(cfg, "api_keys", {}) or {}), "every remote endpoint has its own key variable"
