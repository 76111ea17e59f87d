"Critique reward model mechanics: grouped scoring equals per-pair scoring, losses fall, save/load identity, ACC/ACC+."
import pytest
import torch

from mmrlhf.reward import (CritiqueRewardModel, RewardLossWeights, batch_pairs, reward_batch, reward_loss, rewardbench_metrics)
from mmrlhf.schema import oracle_annotate, pair_indices, parse_query
from mmrlhf.synthetic import make_query, query_media, query_record as world_record
from mmrlhf.testbed import build_tiny_vlm


def groups(seed, n):
    out = []
    for i in range(n):
        q = make_query(seed, i)
        a = oracle_annotate(parse_query(world_record(q, [f"images/{q.id}.png"])))
        crit = [" ".join(r.reasons.values()) for r in a.responses]
        out.append(((query_media(q), a.question, [r.text for r in a.responses], crit), pair_indices(a)))
    return out


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_vl"])
def model(request):
    vlm, processor = build_tiny_vlm(request.param, "tiny", seed=2)
    return CritiqueRewardModel(vlm).eval(), processor


@pytest.mark.parametrize("with_critique", [True, False])
def test_grouped_scores_equal_per_pair_scores(model, with_critique):
    rm, processor = model
    data = groups(1, 3)
    if not with_critique: data = [((m, q, r, None), p) for (m, q, r, _), p in data]
    enc, offsets = reward_batch(processor, [g for g, _ in data])
    with torch.no_grad(): ce, rewards = rm(**enc)
    assert torch.isnan(ce).all() != with_critique
    pairs = batch_pairs(offsets, [p for _, p in data])
    for (g, pl), o in zip(data, offsets):
        m, q, resp, crit = g
        for i, j in pl:
            e, _ = reward_batch(processor, [(m, q, [resp[i], resp[j]], None if crit is None else [crit[i], crit[j]])])
            with torch.no_grad(): _, r2 = rm(**e)
            assert torch.allclose(r2, rewards[[o + i, o + j]], atol=1e-5)


def test_losses_fall_on_a_fixed_batch(model):
    rm, processor = model
    data = groups(2, 3)
    enc, offsets = reward_batch(processor, [g for g, _ in data])
    pairs = batch_pairs(offsets, [p for _, p in data])
    rm.train(); opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=3e-3)
    first = last = None
    for _ in range(12):
        ce, rewards = rm(**enc)
        loss, parts = reward_loss(ce, rewards, pairs)
        opt.zero_grad(); loss.backward(); opt.step()
        first = first or (parts["bt"].item(), parts["critique"].item()); last = (parts["bt"].item(), parts["critique"].item())
    rm.eval()
    assert last[0] < first[0] and last[1] < first[1]


def test_vision_tower_is_frozen_by_default(model):
    rm, _ = model
    frozen = [n for n, p in rm.named_parameters() if not p.requires_grad]
    assert frozen and all("vision_tower" in n or "visual" in n for n in frozen)
    assert all(p.requires_grad for p in rm.head.parameters())


def test_score_only_weights_ignore_critiques():
    ce = torch.tensor([5.0, 7.0]); r = torch.tensor([1.0, -1.0], requires_grad=True)
    total, parts = reward_loss(ce, r, [(0, 1)], RewardLossWeights(critique=0.0, center=0.0))
    assert torch.isclose(total, -torch.nn.functional.logsigmoid(torch.tensor(2.0)))
    assert parts["accuracy"] == 1.0


def test_save_load_identity(model, tmp_path):
    rm, processor = model
    data = groups(3, 2)
    enc, _ = reward_batch(processor, [g for g, _ in data])
    rm.save_pretrained(tmp_path, processor)
    assert (tmp_path / "score_head.safetensors").exists() and (tmp_path / "reward_config.json").exists()
    rm2, proc2 = CritiqueRewardModel.from_pretrained(tmp_path)
    enc2, _ = reward_batch(proc2, [g for g, _ in data])
    with torch.no_grad():
        assert torch.equal(rm(**enc)[1], rm2(**enc2)[1])
    from mmrlhf.testbed import save_vlm
    save_vlm(rm.vlm, processor, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no reward_config.json"):
        CritiqueRewardModel.from_pretrained(tmp_path / "plain")  # a VLM, but not a reward model


def test_empty_critique_is_refused(model):
    _, processor = model
    (m, q, resp, crit), _ = groups(4, 1)[0]
    crit[1] = "  "
    with pytest.raises(ValueError, match="empty critique for response 1"):
        reward_batch(processor, [(m, q, resp, crit)])


def test_acc_and_acc_plus_by_hand():
    results = [("mcq", [(2.0, 1.0), (2.0, 0.5), (1.0, 0.5)]), ("long", [(1.0, 1.0), (3.0, 0.0)]), ("long", [(0.0, 1.0)]),
               ("safety", [(0.2, 0.1)])]
    m = rewardbench_metrics(results)
    assert m["all"]["pairs"] == 7 and m["all"]["acc"][0] == pytest.approx(5 / 7) and m["all"]["acc_plus"][0] == pytest.approx(2 / 4)
    assert m["long"]["acc"][0] == pytest.approx(1 / 3) and m["long"]["acc_plus"][0] == 0.0
    lo, hi = m["all"]["acc"][1:]
    assert lo <= 5 / 7 <= hi


def test_trainer_checkpoints_are_models_and_resume(tmp_path):
    from transformers import TrainingArguments
    from mmrlhf.reward import RewardCollator, RewardTrainer, world_reward_examples
    train = world_reward_examples(5, 12)
    def make(steps, out):
        vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
        model = CritiqueRewardModel(vlm)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-3, save_steps=2,
                                 save_strategy="steps", report_to="none", use_cpu=True, remove_unused_columns=False, seed=0,
                                 disable_tqdm=True, data_seed=0)
        return model, processor, RewardTrainer(model=model, args=args, train_dataset=train, data_collator=RewardCollator(processor),
                                               reward_processor=processor)
    model, processor, trainer = make(4, tmp_path / "a")
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    loaded, _ = CritiqueRewardModel.from_pretrained(ckpt)          # every checkpoint is a usable reward model
    assert (ckpt / "score_head.safetensors").exists()
    model2, _, trainer2 = make(4, tmp_path / "b")
    import shutil; shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-2")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n                    # resumed run ends where the uninterrupted one did


def _exe():
    import shutil, sys
    from pathlib import Path
    return shutil.which("mmrlhf", path=str(Path(sys.executable).parent)) or shutil.which("mmrlhf")


def test_reward_commands_end_to_end(tmp_path):
    import json, subprocess
    from mmrlhf.schema import PairsConfig, run_pairs
    from mmrlhf.synthetic import SynthConfig, write_world
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=10, seed=8))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "pairs"), oracle=True, groups=False))
    data, root = str(tmp_path / "pairs" / "queries.jsonl"), str(tmp_path / "world")
    run = lambda *a: subprocess.run([_exe(), *a], capture_output=True, text=True, timeout=600)
    r = run("train-reward", "--data", data, "--image-root", root, "--out", str(tmp_path / "rm"), "--steps", "3", "--save-steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("score", "--data", data, "--image-root", root, "--model", str(tmp_path / "rm" / "final"), "--out", str(tmp_path / "s"),
            "--critiques", "given")
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = [json.loads(l) for l in (tmp_path / "s" / "pairs.jsonl").read_text().splitlines()]
    queries = {json.loads(l)["id"]: json.loads(l) for l in (tmp_path / "s" / "queries.jsonl").read_text().splitlines()}
    for p in pairs:   # the margin is r(chosen) - r(rejected), with the sign that says which one the model prefers
        rs = queries[p["query_id"]]["responses"]
        assert p["margin"] == pytest.approx(rs[p["chosen_index"]]["reward"] - rs[p["rejected_index"]]["reward"])
    r = run("eval-rewardbench", "--scored", str(tmp_path / "s" / "queries.jsonl"))
    assert r.returncode == 0 and json.loads(r.stdout)["all"]["pairs"] == len(pairs)


def test_eval_rewardbench_reads_the_release_output(tmp_path):
    import json, subprocess
    lines = [{"id": "a", "image": "mcq/1.png", "prompt": "q", "chosen": "x", "rejected": "y", "rewards": [1.0, 0.0]},
             {"id": "a", "image": "mcq/1.png", "prompt": "q", "chosen": "x", "rejected": "z", "rewards": [0.5, 0.5]},
             {"id": "b", "video": "data/video/2", "prompt": "q", "chosen": "x", "rejected": "y", "rewards": [2.0, 1.0]}]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = subprocess.run([_exe(), "eval-rewardbench", "--scored", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    m = json.loads(r.stdout)
    assert m["all"]["acc"][0] == pytest.approx(2 / 3) and m["all"]["acc_plus"][0] == pytest.approx(1 / 2)
    assert m["mcq"]["acc"][0] == pytest.approx(1 / 2) and m["video"]["acc_plus"][0] == 1.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "rewards": [1.0]}) + "\n")
    r = subprocess.run([_exe(), "eval-rewardbench", "--scored", str(tmp_path / "bad.jsonl"), "--layout", "release"], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:1: rewards" in r.stderr


def test_release_preset_renders_system_and_prompt(model):
    from mmrlhf.reward import RELEASE_PROMPT, RELEASE_SYSTEM
    _, processor = model
    (m, q, resp, crit), _ = groups(6, 1)[0]
    enc, _ = reward_batch(processor, [(m, q, resp[:2], crit[:2])], RELEASE_PROMPT, RELEASE_SYSTEM)
    text = processor.tokenizer.decode(enc["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "[Question]: " + q in text and "[LMM Response]: " + resp[0] in text and "\n\n[Evaluation]:<|im_end|>" in text
    row = enc["labels"][0]
    assert processor.tokenizer.decode(row[row != -100]) == crit[0] + "<|im_end|>"   # the system turn is never a target
