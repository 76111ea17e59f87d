"Critique reward model mechanics: grouped scoring equals per-pair scoring, losses fall, save/load identity, ACC/ACC+."
import pytest
import torch

from mmrlhf.reward import (CritiqueRewardModel, RewardLossWeights, batch_pairs, reward_batch, reward_loss, rewardbench_metrics)
from mmrlhf.world import oracle_annotate
from mmrlhf.schema import pair_indices, parse_query
from mmrlhf.world import make_query, query_media, world_record
from mmrlhf.testbed import build_tiny_vlm


def groups(seed, n):
    out = []
    for i in range(n):
        q = make_query(seed, i)
        a = oracle_annotate(parse_query(world_record(q, [f"images/{q.id}.png"])))
        crit = [" ".join(r.reasons.values()) for r in a.responses]
        out.append(((query_media(q), a.question, [r.text for r in a.responses], crit), pair_indices(a)))
    return out


def fit_fixed_batch(rm, enc, pairs, lr, steps=12):
    "Train on one batch; (Bradley-Terry, critique) losses of the first and the last step."
    rm.train(); opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=lr)
    first = last = None
    for _ in range(steps):
        ce, rewards = rm(**enc)
        loss, parts = reward_loss(ce, rewards, pairs)
        opt.zero_grad(); loss.backward(); opt.step()
        last = (parts["bt"].item(), parts["critique"].item()); first = first or last
    rm.eval()
    return first, last


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
    first, last = fit_fixed_batch(rm, enc, pairs, lr=3e-3)
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
    from mmrlhf.reward import RewardCollator, RewardTrainer
    from mmrlhf.world import world_reward_examples
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
    from mmrlhf.formats import PairsConfig
    from mmrlhf.formats import run_pairs
    from mmrlhf.world import SynthConfig, write_world
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


# ---- LoRA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_lora_adapts_only_the_language_model(family):
    from mmrlhf.reward import apply_lora
    vlm, _ = build_tiny_vlm(family, "tiny", seed=0)
    rm = CritiqueRewardModel(apply_lora(vlm, r=4))
    adapted = {n.split(".lora_A")[0] for n, _ in rm.named_parameters() if ".lora_A." in n}
    layers = rm.vlm.config.text_config.num_hidden_layers
    assert len(adapted) == 7 * layers                                    # q, k, v, o, gate, up, down in every LM layer
    assert all(".language_model." in n for n in adapted)                  # never the vision tower (SigLIP has q_proj too)
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert {n for n in trainable if n.startswith("head.")} == {f"head.{k}" for k in rm.head.state_dict()}


def test_lora_trains_adapters_and_head_only_and_saves_a_plain_model(tmp_path):
    from mmrlhf.reward import apply_lora, is_lora
    vlm, processor = build_tiny_vlm("qwen2_vl", "tiny", seed=3)
    rm = CritiqueRewardModel(apply_lora(vlm, r=4, dropout=0.0))
    data = groups(2, 3)
    enc, offsets = reward_batch(processor, [g for g, _ in data])
    pairs = batch_pairs(offsets, [p for _, p in data])
    frozen = {n: p.detach().clone() for n, p in rm.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}
    first, last = fit_fixed_batch(rm, enc, pairs, lr=1e-2)
    assert last[0] < first[0] and last[1] < first[1]
    for n, p in rm.named_parameters():
        if n in frozen: assert torch.equal(p, frozen[n]), n                 # the base is untouched
    assert any(not torch.equal(p, tuned[n]) for n, p in rm.named_parameters() if ".lora_B." in n)
    assert not torch.equal(rm.head.net[4].weight, tuned["head.net.4.weight"])
    rm.save_pretrained(tmp_path, processor)
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    rm2, proc2 = CritiqueRewardModel.from_pretrained(tmp_path)           # a plain model: the adapter is merged
    assert not is_lora(rm2.vlm)
    with torch.no_grad():
        assert torch.allclose(rm(**enc)[1], rm2(**reward_batch(proc2, [g for g, _ in data])[0])[1], atol=1e-5)
        assert torch.allclose(rm(**enc)[0], rm2(**enc)[0], atol=1e-5)


def test_lora_checkpoints_are_models_and_resume(tmp_path):
    import shutil
    from transformers import TrainingArguments
    from mmrlhf.reward import RewardCollator, RewardTrainer, apply_lora
    from mmrlhf.world import world_reward_examples
    train = world_reward_examples(5, 12)
    def make(out):
        vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
        model = CritiqueRewardModel(apply_lora(vlm, r=4, dropout=0.0))
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, save_steps=2,
                                 save_strategy="steps", report_to="none", use_cpu=True, remove_unused_columns=False, seed=0,
                                 disable_tqdm=True, data_seed=0)
        return model, RewardTrainer(model=model, args=args, train_dataset=train, data_collator=RewardCollator(processor), reward_processor=processor)
    model, trainer = make(tmp_path / "a")
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    CritiqueRewardModel.from_pretrained(ckpt)                             # every checkpoint is a usable (merged) reward model
    model2, trainer2 = make(tmp_path / "b")
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-2")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    moved = 0
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n                        # resumed run ends where the uninterrupted one did
    final, _ = CritiqueRewardModel.from_pretrained(ckpt.parent / "checkpoint-4")
    fresh, _ = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(final.vlm.state_dict()[q_proj], fresh.state_dict()[q_proj])   # the adapter was merged in


# ---- long sequences ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_critique", [True, False])
def test_long_responses_are_cut_and_image_tokens_kept(model, with_critique):
    import warnings
    _, processor = model
    (m, q, resp, crit), _ = groups(7, 1)[0]
    resp = [resp[0] + " and so on" * 300] + resp[1:]
    g = (m, q, resp, crit if with_critique else None)
    full, _ = reward_batch(processor, [g])
    n = full["attention_mask"].sum(1)
    limit = int(n[1:].max()) + 20                                        # only the first sequence is too long
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut, offsets = reward_batch(processor, [g], max_length=limit)
    assert len(caught) == 1 and "1 of 4 sequences" in str(caught[0].message)
    assert cut["attention_mask"].sum(1).max() <= limit < n[0]
    img = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert torch.equal((cut["input_ids"] == img).sum(1), (full["input_ids"] == img).sum(1))
    assert torch.equal(cut["input_ids"][1:], full["input_ids"][1:, :cut["input_ids"].shape[1]])   # the others are untouched
    text = processor.tokenizer.decode(cut["input_ids"][0])
    assert q in text and resp[0][:40] in text and "and so on" * 300 not in text
    if with_critique:
        row = cut["labels"][0]
        assert processor.tokenizer.decode(row[row != -100]) == crit[0] + "<|im_end|>"   # room was left: the critique is whole
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reward_batch(processor, [g], max_length=int(n.max()))
    assert not caught                                                    # nothing to cut, no warning


def test_critique_is_cut_after_the_response(model):
    _, processor = model
    (m, q, resp, crit), _ = groups(8, 1)[0]
    g = (m, q, ["x " * 200] + resp[1:], [crit[0] + " Also," * 200] + crit[1:])
    head, _ = reward_batch(processor, [(m, q, ["x"], [crit[0]])])          # the response at one token, the critique whole
    limit = int(head["attention_mask"].sum()) - 5
    with pytest.warns(UserWarning, match="max_length"):
        cut, _ = reward_batch(processor, [g], max_length=limit)
    assert cut["attention_mask"].sum(1).max() <= limit
    row = cut["labels"][0]
    kept = processor.tokenizer.decode(row[row != -100])
    assert kept.endswith("<|im_end|>") and crit[0].startswith(kept.removesuffix("<|im_end|>")[:-2]) and len(kept) < len(crit[0] + "<|im_end|>")
    with pytest.raises(ValueError, match="over max_length=30") as e:
        reward_batch(processor, [g], max_length=30)
    assert repr(q[:60]) in str(e.value)                                  # names the query


# ---- bad data ----------------------------------------------------------------------------------------------------

@pytest.fixture
def pairs_world(tmp_path):
    from mmrlhf.formats import PairsConfig
    from mmrlhf.formats import run_pairs
    from mmrlhf.world import SynthConfig, write_world
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=4, seed=9))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "pairs"), oracle=True, groups=False))
    return tmp_path / "pairs" / "queries.jsonl", tmp_path / "world"


def test_missing_image_names_the_file(pairs_world, tmp_path):
    from mmrlhf.core import DataError
    from mmrlhf.reward import TrainRewardConfig, query_examples, run_train_reward
    data, root = pairs_world
    image = sorted((root / "images").rglob("*.png"))[-1]     # an image, or a frame of a video
    image.unlink()
    for call in (lambda: query_examples(data, root),
                 lambda: run_train_reward(TrainRewardConfig(data=str(data), image_root=str(root), out=str(tmp_path / "rm"), steps=1))):
        with pytest.raises(ValueError, match=image.name) as e:
            call()
        errors = getattr(e.value, "errors", [e.value])                   # schema reports all bad records at once (DataErrors)
        assert any(isinstance(x, DataError) and image.name in str(x) and str(data) in str(x) for x in errors)
    assert not (tmp_path / "rm").exists()                                 # refused before any model was built


def test_response_without_critique_or_reasons_is_refused(pairs_world):
    import json
    from mmrlhf.core import DataError
    from mmrlhf.reward import query_examples
    data, root = pairs_world
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    recs[2]["responses"][1].pop("reasons"); recs[2]["responses"][1].pop("critique", None)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=f"query {recs[2]['id']!r}: a response has no critique or reasons"):
        query_examples(data, root)
    assert len(query_examples(data, root, use_critiques=False)) == 4       # the score-only ablation needs none


# ---- launch configs ----------------------------------------------------------------------------------------------

CONFIGS = __import__("pathlib").Path(__file__).parent.parent / "configs"


def test_deepspeed_and_accelerate_configs_parse():
    import gc, json
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled
    for stage in (2, 3):
        path = CONFIGS / "deepspeed" / f"zero{stage}.json"
        ds = json.loads(path.read_text())
        assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] == "auto"
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
            assert ds[key] == "auto", key                                # the Trainer fills them from its own arguments
        args = TrainingArguments(output_dir="unused", deepspeed=str(path), use_cpu=True, report_to="none", per_device_train_batch_size=3)
        assert args.hf_deepspeed_config.is_zero3() == (stage == 3)
        del args; gc.collect()
    assert not is_deepspeed_zero3_enabled()                               # nothing global left behind for other tests
    assert json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    kinds = {}
    for name in ("single_gpu", "ddp_8gpu", "zero2", "zero3", "multinode"):
        cfg = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
        kinds[name] = (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines)
        if cfg.deepspeed_config:
            ds = CONFIGS.parent / cfg.deepspeed_config["deepspeed_config_file"]
            assert ds.is_file(), ds
            assert not ({"zero_stage", "gradient_accumulation_steps", "offload_optimizer_device"} & set(cfg.deepspeed_config))
            assert cfg.mixed_precision in (None, "no")                     # accelerate refuses it beside a JSON
    assert kinds == {"single_gpu": ("NO", 1, 1), "ddp_8gpu": ("MULTI_GPU", 8, 1), "zero2": ("DEEPSPEED", 8, 1),
                     "zero3": ("DEEPSPEED", 8, 1), "multinode": ("DEEPSPEED", 16, 2)}


def _dist_env(port):
    import os
    return {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def test_deepspeed_zero3_lora_run_saves_a_usable_model(pairs_world, tmp_path):
    "One-process ZeRO-3 in bf16 on CPU (DeepSpeed's CPU accelerator): the gathered weights, adapter merged in, are a reward model."
    pytest.importorskip("deepspeed")
    import subprocess
    data, root = pairs_world
    r = subprocess.run([_exe(), "train-reward", "--data", str(data), "--image-root", str(root), "--out", str(tmp_path / "rm"), "--steps", "2",
                        "--save-steps", "2", "--deepspeed", str(CONFIGS / "deepspeed" / "zero3.json"), "--lora-r", "4", "--batch-size", "2", "--bf16"],
                       capture_output=True, text=True, timeout=600, env=_dist_env(29531))
    assert (tmp_path / "rm" / "final" / "lora").is_dir(), (r.stdout + r.stderr)[-3000:]
    rm, processor = CritiqueRewardModel.from_pretrained(tmp_path / "rm" / "final")
    data = groups(3, 2)
    with torch.no_grad(): ce, rewards = rm(**reward_batch(processor, [g for g, _ in data])[0])
    assert torch.isfinite(rewards).all() and torch.isfinite(ce).all() and rewards.std() > 0


# ---- distributed -------------------------------------------------------------------------------------------------

DDP_SCRIPT = '''
import os, sys
from dataclasses import replace
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from mmrlhf.reward import CritiqueRewardModel, RewardCollator, RewardTrainer
from mmrlhf.world import world_reward_examples
from mmrlhf.testbed import build_tiny_vlm, quiet_cpu_run
quiet_cpu_run(); torch.set_num_threads(1)
out, batch_size, grad_accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Queries with different numbers of responses (2 to 4) and of pairs (1 to 6). A loss that is a mean over each process's
# (or micro-batch's) own pairs and critiques weighs a pair by who shares its batch; the mean over the global batch does not.
shapes = [(4, 4), (2, 1), (4, 6), (3, 2), (2, 1), (4, 5), (3, 1), (4, 3)]
train, pool = [], list(world_reward_examples(0, 40))
for k, p in shapes:  # the first unused query with at least p pairs among its first k responses
    e = next(e for e in pool if len([1 for c, r in e.pairs if c < k and r < k]) >= p)
    pool.remove(e)
    pairs = [(c, r) for c, r in e.pairs if c < k and r < k][:p]
    train.append(replace(e, responses=e.responses[:k], critiques=e.critiques[:k], pairs=pairs))
vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
model = CritiqueRewardModel(vlm)
# plain SGD without clipping: the update is proportional to the gradient, so any mis-scaled loss shows (Adam would hide it)
args = TrainingArguments(output_dir=os.path.dirname(out) + "/run-" + os.path.basename(out), per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=grad_accum, max_steps=4, learning_rate=0.05, optim="sgd", max_grad_norm=0.0,
                         save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False, seed=0, data_seed=0,
                         disable_tqdm=True, logging_steps=100)
trainer = RewardTrainer(model=model, args=args, train_dataset=train, data_collator=RewardCollator(processor), reward_processor=processor)
trainer.train()
if trainer.args.process_index == 0:
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, out)
    print("world size", trainer.args.world_size, flush=True)
trainer.accelerator.end_training()
os._exit(0)   # gloo can abort at interpreter exit after a finished run (env-probe section 5): the saved file is the result
'''


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    import os, subprocess, sys
    d = tmp_path_factory.mktemp("ddp")
    (d / "train.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    done = {}
    def run(name, batch_size, grad_accum=1, processes=1):
        if name in done: return done[name]
        launch = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
        r = subprocess.run(launch + [str(d / "train.py"), str(d / f"{name}.safetensors"), str(batch_size), str(grad_accum)],
                           capture_output=True, text=True, timeout=300, env={**env, "ACCELERATE_USE_CPU": "1"})
        done[name] = d / f"{name}.safetensors", r
        return done[name]
    return run


def _params(path, r):
    from safetensors.torch import load_file
    assert path.exists(), (r.stdout + r.stderr)[-3000:]                    # the launcher's exit code is not trusted (gloo may abort at exit)
    return load_file(str(path)), r.stdout


def test_two_processes_equal_one_process(ddp_runs):
    one, out1 = _params(*ddp_runs("one", 4))
    two, out2 = _params(*ddp_runs("two", 2, processes=2))
    assert "world size 1" in out1 and "world size 2" in out2
    assert one.keys() == two.keys() and any(k.startswith("head.") for k in one) and any("language_model" in k for k in one)
    for k in one: assert torch.allclose(one[k], two[k], atol=1e-5), k
    half, _ = _params(*ddp_runs("half", 2))                                # one process, half the batch: a different run
    assert max((one[k] - half[k]).abs().max().item() for k in one) > 1e-4


def test_gradient_accumulation_equals_a_bigger_batch(ddp_runs):
    one, _ = _params(*ddp_runs("one", 4))
    acc, _ = _params(*ddp_runs("acc", 2, grad_accum=2))
    for k in one: assert torch.allclose(one[k], acc[k], atol=1e-5), k


def test_critique_source_and_margins(tmp_path):
    from mmrlhf.reward import query_examples, RewardCollator
    from mmrlhf.formats import PairsConfig
    from mmrlhf.schema import read_queries, write_queries, joined_reasons
    from mmrlhf.formats import run_pairs
    from mmrlhf.world import SynthConfig, write_world
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=4, seed=1))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "pairs"), oracle=True, groups=False))
    qs = list(read_queries(tmp_path / "pairs" / "queries.jsonl"))
    for q in qs:
        for r in q.responses: r.critique = "EXPANDED " + joined_reasons(r)
    write_queries(tmp_path / "q.jsonl", qs)
    expanded = query_examples(tmp_path / "q.jsonl", tmp_path / "world")
    raw = query_examples(tmp_path / "q.jsonl", tmp_path / "world", critique_source="raw", margin_scale=0.5)
    assert all(c.startswith("EXPANDED") for e in expanded for c in e.critiques)
    assert not any(c.startswith("EXPANDED") for e in raw for c in e.critiques) and expanded[0].margins is None
    q0 = qs[0]; mean = [sum(r.scores.values()) / 3 for r in q0.responses]
    assert raw[0].margins == pytest.approx([0.5 * (mean[c] - mean[r]) for c, r in raw[0].pairs])
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    rm = CritiqueRewardModel(vlm).eval()
    batch = RewardCollator(processor)(raw[:2]); pairs, margins = batch.pop("pairs"), batch.pop("margins")
    with torch.no_grad(): ce, rewards = rm(**batch)
    with_m, _ = reward_loss(ce, rewards, pairs, margins=margins)
    without, _ = reward_loss(ce, rewards, pairs)
    assert margins.shape == (len(pairs),) and (margins >= 0).all() and with_m > without  # a positive margin asks for more


# ---- loss forms and pair-less batches ----------------------------------------------------------------------------

def _bt(d): import math; return math.log1p(math.exp(-d))


def test_loss_forms_match_an_independent_computation(model):
    "paper: pair terms over pairs, critique CE over critiqued sequences; release: per pair BT + 0.01 centre + CE_w + CE_l."
    rm, processor = model
    data = groups(11, 3)
    enc, offsets = reward_batch(processor, [g for g, _ in data])
    with torch.no_grad(): ce, rewards = rm(**enc)
    pairs = batch_pairs(offsets, [p for _, p in data])
    assert len({len(p) for _, p in data}) > 1 or len(pairs) > 3
    r, c = rewards.tolist(), ce.tolist()
    w = RewardLossWeights(critique=0.7, score=1.3, center=0.01)
    bt = sum(_bt(r[i] - r[j]) for i, j in pairs) / len(pairs)
    centre = sum((r[i] + r[j]) ** 2 for i, j in pairs) / len(pairs)
    paper = 1.3 * bt + 0.01 * centre + 0.7 * sum(c) / len(c)
    release = sum(1.3 * _bt(r[i] - r[j]) + 0.01 * (r[i] + r[j]) ** 2 + 0.7 * (c[i] + c[j]) for i, j in pairs) / len(pairs)
    assert abs(paper - release) > 1e-3                                       # the two forms differ on this batch
    assert reward_loss(ce, rewards, pairs, w)[0].item() == pytest.approx(paper, rel=1e-5)
    assert reward_loss(ce, rewards, pairs, w, form="paper")[0].item() == pytest.approx(paper, rel=1e-5)
    assert reward_loss(ce, rewards, pairs, w, form="release")[0].item() == pytest.approx(release, rel=1e-5)
    with pytest.raises(ValueError, match="release"):
        reward_loss(ce, rewards, pairs, w, form="per-token")


def test_trainer_loss_form_is_the_named_formula(tmp_path):
    from transformers import TrainingArguments
    from mmrlhf.reward import RewardCollator, RewardTrainer
    from mmrlhf.world import world_reward_examples
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    rm = CritiqueRewardModel(vlm).eval()
    ex = world_reward_examples(3, 3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    batch = RewardCollator(processor)(ex)
    with torch.no_grad():
        ce, rewards = rm(**{k: v for k, v in batch.items() if k != "pairs"})
        for form in ("paper", "release"):
            trainer = RewardTrainer(model=rm, args=args, data_collator=RewardCollator(processor), reward_processor=processor, loss_form=form)
            assert trainer.count_items(batch) == {"pairs": sum(len(e.pairs) for e in ex), "critiques": sum(len(e.responses) for e in ex)}
            got = trainer.compute_loss(rm, dict(batch))
            assert got.item() == pytest.approx(reward_loss(ce, rewards, batch["pairs"], form=form)[0].item(), rel=1e-5)


def test_batch_without_pairs_keeps_only_its_critique_term(model):
    rm, processor = model
    (m, q, resp, crit), _ = groups(12, 1)[0]
    enc, _ = reward_batch(processor, [(m, q, resp, crit)])
    rm.train()
    ce, rewards = rm(**enc)
    total, parts = reward_loss(ce, rewards, [])                            # a query whose responses are all tied
    rm.eval()
    assert total.item() == pytest.approx(ce.mean().item(), rel=1e-6) and parts["bt"] == 0 and parts["center"] == 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in rm.named_parameters() if "language_model" in n)
    rm.zero_grad(set_to_none=True)


def _retie(data, which):
    import json
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    for i in which: recs[i]["ranking"] = [1] * len(recs[i]["responses"])
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_all_tied_data_is_refused(pairs_world, tmp_path):
    from mmrlhf.core import DataError
    from mmrlhf.reward import TrainRewardConfig, run_train_reward
    data, root = pairs_world
    _retie(data, range(4))
    with pytest.raises(DataError, match="no pair to train") as e:
        run_train_reward(TrainRewardConfig(data=str(data), image_root=str(root), out=str(tmp_path / "rm"), steps=1))
    assert e.value.field == "ranking" and str(data) in str(e.value)
    assert not (tmp_path / "rm").exists()


def test_score_refuses_a_non_finite_reward(pairs_world, tmp_path):
    from mmrlhf.core import DataError
    from mmrlhf.reward import ScoreConfig, run_score
    data, root = pairs_world
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    rm = CritiqueRewardModel(vlm)
    with torch.no_grad(): rm.head.net[4].bias.fill_(float("nan"))          # a broken model
    rm.save_pretrained(tmp_path / "broken", processor)
    first = __import__("json").loads(data.read_text().splitlines()[0])["id"]
    with pytest.raises(DataError, match=f"query {first!r}: .*nan, not a finite number"):
        run_score(ScoreConfig(data=str(data), image_root=str(root), model=str(tmp_path / "broken"), out=str(tmp_path / "s"),
                              critiques="given"))
    assert not (tmp_path / "s" / "queries.jsonl").exists() and not (tmp_path / "s" / "pairs.jsonl").exists()


# ---- resume and long inputs --------------------------------------------------------------------------------------

def _final_weights(folder):
    from safetensors.torch import load_file
    head = load_file(str(folder / "score_head.safetensors"))
    vlm = {}
    for f in sorted(folder.glob("model*.safetensors")): vlm.update(load_file(str(f)))
    return {**head, **vlm}


def test_resume_skips_an_incomplete_checkpoint(pairs_world, tmp_path):
    import json, shutil
    from mmrlhf.reward import TrainRewardConfig, run_train_reward
    data, root = pairs_world
    out = tmp_path / "rm"
    cfg = TrainRewardConfig(data=str(data), image_root=str(root), out=str(out), steps=4, save_steps=2, batch_size=2)
    run_train_reward(cfg)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= {"checkpoint-2", "checkpoint-4", "final"}
    assert not list(out.glob(".*.partial")) and not any(out.glob(".staging/*"))   # no staging folder left behind
    whole = _final_weights(out / "final")
    # a run killed while writing checkpoint-4: only its config.json was written
    shutil.rmtree(out / "checkpoint-4"); shutil.rmtree(out / "final")
    (out / "checkpoint-4").mkdir(); shutil.copy(out / "checkpoint-2" / "config.json", out / "checkpoint-4" / "config.json")
    (out / ".final.partial").mkdir(); (out / ".final.partial" / "config.json").write_text("{}")   # and a half-written final
    cfg.resume = True
    with pytest.warns(UserWarning, match="checkpoint-4"):
        run_train_reward(cfg)
    resumed = _final_weights(out / "final")
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert whole.keys() == resumed.keys()
    for k in whole: assert torch.allclose(whole[k], resumed[k], atol=1e-6), k   # continued from checkpoint-2 to the same end
    assert not (out / ".final.partial").exists()


def test_a_1mb_question_is_left_out_counted_and_named(pairs_world, tmp_path, capsys):
    import json
    from mmrlhf.reward import ScoreConfig, TrainRewardConfig, run_score, run_train_reward
    data, root = pairs_world
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    recs[1]["question"] = "Describe the picture. " * 48000                 # about 1 MB
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    final = run_train_reward(TrainRewardConfig(data=str(data), image_root=str(root), out=str(tmp_path / "rm"), steps=1, save_steps=1))
    said = capsys.readouterr().out
    assert f"1 of 4 queries left out" in said and repr(recs[1]["id"]) in said and "trained on 3 of 4 queries" in said
    result = run_score(ScoreConfig(data=str(data), image_root=str(root), model=str(final), out=str(tmp_path / "s"), critiques="given"))
    assert result["queries"] == 3 and result["rejected"] == 1                 # count in = count out + rejects
    rejected = [json.loads(l) for l in (tmp_path / "s" / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == [recs[1]["id"]] and "max_length=32768" in rejected[0]["reason"]
    scored = [json.loads(l)["id"] for l in (tmp_path / "s" / "queries.jsonl").read_text().splitlines()]
    assert scored == [r["id"] for i, r in enumerate(recs) if i != 1]


def test_generation_prompts_are_cut_to_max_length(pairs_world, tmp_path):
    import json
    from mmrlhf.reward import ScoreConfig, run_score
    from mmrlhf.testbed import save_vlm
    data, root = pairs_world
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    recs[0]["responses"][0]["text"] = "It is a shape. " * 20000             # a 300 kB response
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    CritiqueRewardModel(vlm).save_pretrained(tmp_path / "rm", processor)
    result = run_score(ScoreConfig(data=str(data), image_root=str(root), model=str(tmp_path / "rm"), out=str(tmp_path / "s"),
                                   max_new_tokens=4, max_length=400))
    assert result["queries"] == 4 and result["rejected"] == 0 and result["cut_for_generation"] == 1
    scored = [json.loads(l) for l in (tmp_path / "s" / "queries.jsonl").read_text().splitlines()]
    assert scored[0]["responses"][0]["text"] == recs[0]["responses"][0]["text"]   # the data keeps the whole response
    assert all(isinstance(r["reward"], float) for q in scored for r in q["responses"])


@pytest.mark.parametrize("steps", [1, 19, 20, 39, 100, 300, 1234])
def test_training_arguments_keep_the_former_schedule(steps, tmp_path):
    "The shared mapping gives train-reward its former warmup (steps // 20) and logging (steps // 10)."
    from mmrlhf.configs import TrainRewardConfig
    args = TrainRewardConfig(steps=steps, out=str(tmp_path)).training_arguments()
    assert (args.warmup_steps, args.logging_steps) == (max(1, steps // 20), max(1, steps // 10))
    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type.value) == (steps, 2e-3, "cosine")
