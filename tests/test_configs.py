"Cluster recipes: each parses into its command's settings and agrees with its launcher and DeepSpeed config."
import json
import re
from pathlib import Path

import pytest
import yaml

from mmrlhf.cli import COMMANDS

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
    assert {p.parent.name for p in RECIPES} == {"llava_ov_7b", "qwen2_vl_7b"}
    for model in ("llava_ov_7b", "qwen2_vl_7b"):
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
