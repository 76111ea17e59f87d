"""Every test-bed family through the commands: ref-logps, train-dpo (full, and LoRA under gradient checkpointing),
train-reward, score with generated critiques, respond and eval, on a tiny shapes world: in the packed layout, or in
one sequence per response with the reason said where the packed one cannot hold."""
import math

import pytest
import torch

from mmrlhf.configs import DEFAULT_MIX, EvalConfig
from mmrlhf.evaluate import run_eval, run_scores
from mmrlhf.dpo import RefLogpsConfig, TrainDPOConfig, run_ref_logps, run_train_dpo
from mmrlhf.formats import PairsConfig, run_pairs
from mmrlhf.models import load_policy, load_vlm
from mmrlhf.respond import RespondConfig, run_respond
from mmrlhf.reward import ScoreConfig, TrainRewardConfig, run_score, run_train_reward
from mmrlhf.schema import read_queries, write_queries
from mmrlhf.testbed import FAMILIES, build_tiny_vlm
from mmrlhf.world import SynthConfig, write_world


# where each test-bed family keeps its vision tower (stated here, not read from the package)
TOWERS = ("model.vision_tower.", "model.visual.", "model.vision_model.")


# families whose language model has linear-attention layers (stated here): the commands fall back to one sequence per
# response, and LoRA also adapts the linear-attention projections
RECURRENT = ("qwen3_5",)
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "out_proj")


def assert_layout_said(family, out):
    "The run's log names the layout it used, and why where it is not the packed one."
    if family in RECURRENT:
        assert "layout: packed cannot hold" in out and "'linear_attention' layers" in out, out
        assert "layout: grouped (one sequence per response)" in out
    else:
        assert "layout: packed" in out and "cannot hold" not in out


def in_vision(name):
    "Whether a parameter belongs to a vision tower."
    return name.startswith(TOWERS)


def in_language_model(name):
    "Whether a parameter is one of the language model's decoder layers (SmolVLM's is `text_model`)."
    return ".layers." in name and not in_vision(name)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_world(request, tmp_path_factory):
    "A family and a 6-query world it can read (no clips for an image-only family), annotated by the oracle."
    family, d = request.param, tmp_path_factory.mktemp(request.param)
    mix = DEFAULT_MIX if FAMILIES[family]["video_placeholder"] else {**DEFAULT_MIX, "video": 0.0}
    write_world(SynthConfig(out=str(d / "world"), n_queries=6, seed=2, mix=mix))
    run_pairs(PairsConfig(input=str(d / "world" / "queries.jsonl"), out=str(d / "pairs"), oracle=True, groups=False))
    return family, d


def test_dpo_path(family_world, capsys):
    family, d = family_world
    base, world = f"tiny:{family}", d / "world"
    qs = list(read_queries(d / "pairs" / "queries.jsonl"))
    for q in qs:  # stand-in rewards: the oracle's mean score
        for r in q.responses: r.reward = sum(r.scores.values()) / 3
    write_queries(d / "scored.jsonl", qs)
    ref = run_ref_logps(RefLogpsConfig(data=str(d / "scored.jsonl"), image_root=str(world), model=base,
                                       out=str(d / "ref")))
    logps = [r.ref_logp for q in read_queries(ref) for r in q.responses]
    assert len(logps) == sum(len(q.responses) for q in qs) and all(math.isfinite(v) and v < 0 for v in logps)
    full = run_train_dpo(TrainDPOConfig(data=str(ref), image_root=str(world), base=base, out=str(d / "dpo"),
                                        steps=2, batch_size=2, lr=1e-3))
    assert_layout_said(family, capsys.readouterr().out)
    start = build_tiny_vlm(family, "tiny", seed=0)[0].state_dict()
    trained = load_vlm(full)[0].state_dict()
    changed = [k for k, v in start.items() if not torch.equal(v, trained[k])]
    assert any(in_language_model(k) for k in changed)
    assert not [k for k in changed if in_vision(k)]     # the vision tower stays frozen
    lora = run_train_dpo(TrainDPOConfig(data=str(ref), image_root=str(world), base=base, out=str(d / "lora"),
                                        steps=2, batch_size=2, lr=1e-3, lora_r=4, gradient_checkpointing=True))
    merged = load_policy(str(lora))[0].state_dict()       # a built base: the adapter comes merged
    moved = [k for k in start if not torch.equal(start[k], merged[k])]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    projections += LINEAR_ATTENTION if family in RECURRENT else ()
    assert moved and all(any(p in k for p in projections) for k in moved), moved[:5]
    if family in RECURRENT: assert any("linear_attn." in k for k in moved)
    assert_layout_said(family, capsys.readouterr().out)
    assert not [k for k in moved if in_vision(k)]


def test_reward_path_and_respond(family_world, capsys):
    family, d = family_world
    base, world, data = f"tiny:{family}", d / "world", d / "pairs" / "queries.jsonl"
    rm = run_train_reward(TrainRewardConfig(data=str(data), image_root=str(world), base=base, out=str(d / "rm"),
                                            steps=2, batch_size=2))
    assert_layout_said(family, capsys.readouterr().out)
    result = run_score(ScoreConfig(data=str(data), image_root=str(world), model=str(rm), out=str(d / "s"),
                                   max_new_tokens=8))
    assert result["queries"] == 6 and result["rejected"] == 0
    assert_layout_said(family, capsys.readouterr().out)
    qs = list(read_queries(d / "s" / "queries.jsonl", world))
    rewards = [r.reward for q in qs for r in q.responses]
    assert len(qs) == 6 and all(isinstance(v, float) and math.isfinite(v) for v in rewards)
    assert all(r.critique for q in qs for r in q.responses)      # each response's critique, written by the model
    out = run_respond(RespondConfig(data=str(world / "queries.jsonl"), models=[base], out=str(d / "respond"),
                                    max_new_tokens=4, batch_size=3, temperature=0.0))
    answered = list(read_queries(out))
    assert len(answered) == 6 and all(q.responses[-1].model == base for q in answered)
    run = run_eval(EvalConfig(model=base, bench=str(world / "queries.jsonl"), out=str(d / "eval"),
                              max_new_tokens=4, batch_size=3))
    predictions = (d / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6
    assert any(metric == "accuracy" for _, metric in run_scores(run))
