"MM-DPO: β rules, equality with TRL's DPO at w=0, grouped and prefix-shared steps equal the per-pair computation, commands, resume, 2 processes."
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmrlhf.core import ConfigError, DataError
from mmrlhf.dpo import (DPOCollator, MMDPOSettings, RefLogpsConfig, TrainDPOConfig, dynamic_beta, group_dpo_loss, implicit_beta, mmdpo_loss, naive_pair_loss, pair_betas, reference_logps, run_ref_logps, run_train_dpo)
from mmrlhf.world import world_dpo_examples
from mmrlhf.logprobs import encode_groups, response_logps
from mmrlhf.formats import PairsConfig
from mmrlhf.schema import read_queries, write_queries
from mmrlhf.formats import run_pairs
from mmrlhf.world import SynthConfig, write_world
from mmrlhf.testbed import build_tiny_vlm, load_vlm


def test_dynamic_beta_is_the_papers_formula():
    d = torch.tensor([-1.0, 0.0, 1.0, 3.0, 50.0])
    want = [0.1 * (1 + 0.5 * (1 - math.exp(-0.5 * x))) for x in d.tolist()]
    assert torch.allclose(dynamic_beta(d), torch.tensor(want))
    b = dynamic_beta(torch.linspace(0, 40, 100))
    assert b.min() >= 0.1 - 1e-7 and b.max() <= 0.15 + 1e-7 and (b.diff() >= 0).all()


def test_delta_policies():
    h = torch.zeros(3)
    delta = torch.tensor([-2.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="1 of 3 pairs have no reward margin"): pair_betas(delta, h)  # the default refuses
    b, keep = pair_betas(delta, h, MMDPOSettings(missing_delta="fixed"))  # clamp, fixed
    assert torch.allclose(b, torch.tensor([0.1, 0.1, float(dynamic_beta(2.0))])) and keep.all()
    b, keep = pair_betas(delta, h, MMDPOSettings(negative_delta="skip", missing_delta="skip"))
    assert keep.tolist() == [False, False, True]
    b, _ = pair_betas(delta, h, MMDPOSettings(negative_delta="keep", missing_delta="fixed"))
    assert b[0] < 0.1
    with pytest.raises(ValueError, match="no reward margin"): pair_betas(delta, h, MMDPOSettings(missing_delta="error"))
    with pytest.raises(ConfigError, match="beta_mode"): pair_betas(delta, h, MMDPOSettings(beta_mode="adaptive"))
    losses, _, _ = mmdpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), delta, negative_delta="skip", missing_delta="skip")
    assert losses.tolist()[:2] == [0.0, 0.0] and abs(losses[2].item() - math.log(2)) < 1e-6


def test_implicit_beta_follows_the_release():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.1, 0.4, -0.2, 0.3, 1.5, -0.9, 0.0, 0.2, 0.5, -0.1])
    b = implicit_beta(a, beta=0.1, w=0.1, generator=g)
    # recompute by hand with the same draw
    g2 = torch.Generator().manual_seed(0)
    p = torch.exp(-0.5 * ((a - a.mean()) / (a.std() + 1e-7)) ** 2)
    drawn = torch.multinomial(p, 8, replacement=False, generator=g2)
    assert torch.isclose(b, 0.1 * (1 + 0.1 * (a[drawn].mean() - a.mean())))
    assert float(implicit_beta(torch.tensor([3.0]))) == pytest.approx(0.1)


def _trl_sigmoid_dpo(beta, pc, pr, rc, rr):
    "TRL's DPOTrainer loss and rewards on given per-token log-probs (its own _compute_loss, without a model forward)."
    from trl import DPOTrainer
    n, T = len(pc), 3
    per_token = torch.zeros(2 * n, T)  # spread each sequence's log-prob over its completion tokens
    per_token[:n, 0], per_token[n:, 0] = pc, pr
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=beta, use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, T), mean_logits=torch.zeros(2 * n, T),
                              is_top1=torch.zeros(2 * n, T, dtype=torch.bool))
    mask = torch.zeros(2 * n, T + 1, dtype=torch.long); mask[:, 1] = 1
    inputs = {"input_ids": torch.ones(2 * n, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    m = fake._metrics["train"]
    return loss, m["rewards/chosen"][-1], m["rewards/rejected"][-1]


def test_w0_is_standard_dpo_as_in_trl():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) * 3 - 20 for _ in range(4))
    delta = torch.rand(5) * 4
    ours, cr, rj = mmdpo_loss(pc, pr, rc, rr, delta, beta=0.1, w=0.0)
    fixed, _, _ = mmdpo_loss(pc, pr, rc, rr, delta, beta=0.1, beta_mode="fixed")
    assert torch.allclose(ours, fixed)
    for i in range(5):  # one pair at a time: TRL logs batch means
        loss, trl_c, trl_r = _trl_sigmoid_dpo(0.1, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1])
        assert loss.item() == pytest.approx(ours[i].item(), rel=1e-6)
        assert trl_c == pytest.approx(cr[i].item(), rel=1e-5, abs=1e-7) and trl_r == pytest.approx(rj[i].item(), rel=1e-5, abs=1e-7)
    loss, _, _ = _trl_sigmoid_dpo(0.1, pc, pr, rc, rr)
    assert loss.item() == pytest.approx(ours.mean().item(), rel=1e-6)


def _plain_logp(vlm, processor, medium, question, response):
    "log π(response | image, question) and its token count from one plain forward over the full conversation."
    from mmrlhf.testbed import chat_batch
    enc = dict(chat_batch(processor, [medium], [question], [response]))
    labels = enc.pop("labels")[0]
    logits = vlm(**enc).logits[0].float()
    target, keep = labels[1:], labels[1:] != -100
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
    return lp[keep].sum(), keep.sum()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("layout", ["packed", "shared", "grouped"])
def test_group_step_equals_per_pair(family, layout):
    "The step in every layout against the paper's formula written out here, pair by pair, full sequences."
    vlm, processor = build_tiny_vlm(family, "tiny", seed=1)
    examples = world_dpo_examples(3, 3)
    examples[0].deltas[0] = -1.0  # negative: skipped (both terms)
    examples[1].deltas[1] = None  # missing: skipped (both terms)
    torch.manual_seed(0)
    ref = [[float(x) for x in torch.randn(len(e.responses)) - 30] for e in examples]
    for e, r in zip(examples, ref): e.ref_logps = r
    beta, w, k, gamma = 0.1, 0.5, 0.5, 0.5
    settings = MMDPOSettings(beta=beta, w=w, k=k, gamma=gamma, negative_delta="skip", missing_delta="skip")
    batch = DPOCollator(processor, layout=layout)(examples)
    vlm.zero_grad()
    grouped = group_dpo_loss(*response_logps(vlm, batch), batch["ref_logps"], batch["pairs"], batch["delta"], settings)[0]
    grouped.backward()
    g1 = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad()
    dpo, sft, kept = 0.0, 0.0, 0
    for e, ref_e in zip(examples, ref):
        for (c, r), d in zip(e.pairs, e.deltas):
            if d is None or d < 0: continue
            pc, nc = _plain_logp(vlm, processor, e.medium, e.question, e.responses[c])
            pr, _ = _plain_logp(vlm, processor, e.medium, e.question, e.responses[r])
            b = beta * (1 + w * (1 - math.exp(-k * d)))
            dpo = dpo - F.logsigmoid(b * ((pc - ref_e[c]) - (pr - ref_e[r])))
            sft = sft - pc / nc
            kept += 1
    assert 0 < kept < sum(len(e.pairs) for e in examples)
    formula = dpo / kept + gamma * sft / kept
    formula.backward()
    g2 = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    assert grouped.item() == pytest.approx(formula.item(), rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1: assert torch.allclose(g1[n], g2[n], atol=1e-5, rtol=1e-4), n


def test_sft_term_and_w_follow_the_policies():
    "The SFT term leaves out the pairs the δ policies drop; each β rule has its own default w."
    logps, ntok = torch.tensor([-10.0, -14.0, -9.0, -20.0]), torch.tensor([5, 7, 3, 10])
    ref, pairs = torch.tensor([-11.0, -13.0, -9.5, -18.0]), torch.tensor([[0, 1], [2, 3], [0, 3]])
    delta = torch.tensor([1.0, -2.0, float("nan")])
    s = MMDPOSettings(gamma=1.0, negative_delta="skip", missing_delta="skip")
    _, m = group_dpo_loss(logps, ntok, ref, pairs, delta, s)
    assert float(m["sft"]) == pytest.approx(10.0 / 5)  # pair 0 only: -logp(chosen)/tokens
    h = (-10.0 + 11.0) - (-14.0 + 13.0)
    assert float(m["dpo"]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * (1 + 0.5 * (1 - math.exp(-0.5))) * h))), rel=1e-6)
    # beta_mode=implicit without w: the release's ls_factor_weight 0.1, not the dynamic rule's 0.5
    a = torch.tensor([0.1, 0.4, -0.2, 0.3, 1.5, -0.9, 0.0, 0.2, 0.5, -0.1])
    b, _ = pair_betas(None, a, MMDPOSettings(beta_mode="implicit"), generator=torch.Generator().manual_seed(0))
    p = torch.exp(-0.5 * ((a - a.mean()) / (a.std() + 1e-7)) ** 2)
    drawn = torch.multinomial(p, 8, replacement=False, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(b, 0.1 * (1 + 0.1 * (a[drawn].mean() - a.mean())).expand(10))
    assert MMDPOSettings().w is None and TrainDPOConfig().w is None
    dyn, _ = pair_betas(torch.tensor([2.0]), torch.zeros(1))
    assert float(dyn) == pytest.approx(0.1 * (1 + 0.5 * (1 - math.exp(-1.0))))


def test_truncation_keeps_image_tokens():
    vlm, processor = build_tiny_vlm("qwen2_vl", "tiny", seed=0)
    e = world_dpo_examples(0, 1)[0]
    groups = [(e.medium, e.question, ["a b c " * 200, e.responses[0]])]
    with pytest.warns(UserWarning, match="1 of 2 responses truncated"):
        b = encode_groups(processor, groups, layout="grouped", max_length=150)
    full = b["full"]
    assert full["input_ids"].shape[1] <= 150
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ((full["input_ids"] == image_token).sum(1) == (full["input_ids"][1] == image_token).sum()).all()
    with torch.no_grad(): lp, n = response_logps(vlm, b)
    assert torch.isfinite(lp).all() and n[0] > n[1]


def _world(tmp_path, n=8, seed=2):
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=n, seed=seed))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "pairs"), oracle=True, groups=False))
    qs = list(read_queries(tmp_path / "pairs" / "queries.jsonl"))
    for q in qs:  # stand-in rewards: the oracle's mean score
        for r in q.responses: r.reward = sum(r.scores.values()) / 3
    write_queries(tmp_path / "scored.jsonl", qs)
    return tmp_path / "scored.jsonl", tmp_path / "world"


def test_commands_resume_and_bad_input(tmp_path):
    data, world = _world(tmp_path)
    with pytest.raises(DataError, match="ref-logps"):
        run_train_dpo(TrainDPOConfig(data=str(data), image_root=str(world), out=str(tmp_path / "x"), steps=1))
    with pytest.raises(ConfigError, match="beta_mode"):
        run_train_dpo(TrainDPOConfig(data=str(data), image_root=str(world), out=str(tmp_path / "x"), steps=1, beta_mode="adaptive"))
    ref_out = tmp_path / "ref"
    ref_file = run_ref_logps(RefLogpsConfig(data=str(data), image_root=str(world), out=str(ref_out), batch_size=3))
    first = [r.ref_logp for q in read_queries(ref_file) for r in q.responses]
    assert all(isinstance(v, float) and v < 0 for v in first)
    # an interrupted run: drop the last shard lines and the output; the rerun computes only what is missing
    shard = ref_out / "ref-shards" / "rank0.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:3]) + "\n"); ref_file.unlink()
    run_ref_logps(RefLogpsConfig(data=str(data), image_root=str(world), out=str(ref_out), batch_size=3))
    assert len(shard.read_text().splitlines()) == len(lines)
    again = [r.ref_logp for q in read_queries(ref_file) for r in q.responses]
    assert again == pytest.approx(first, rel=1e-5)

    def train(out, steps=4, resume=False):
        return run_train_dpo(TrainDPOConfig(data=str(ref_file), image_root=str(world), out=str(out), steps=steps, save_steps=2,
                                            batch_size=2, lr=1e-3, resume=resume))
    straight = load_file(str(train(tmp_path / "a") / "model.safetensors"))
    out_b = tmp_path / "b"
    train(out_b)
    import shutil
    shutil.rmtree(out_b / "checkpoint-4"); shutil.rmtree(out_b / "final")
    resumed = load_file(str(train(out_b, resume=True) / "model.safetensors"))
    changed = 0
    for k, v in straight.items():
        assert torch.allclose(v, resumed[k], atol=1e-6), k
    start, trained = build_tiny_vlm("llava_onevision", "tiny", seed=0)[0].state_dict(), load_vlm(tmp_path / "a" / "final")[0].state_dict()
    changed = [k for k, v in start.items() if not torch.equal(v, trained[k])]
    assert changed and not any("vision_tower" in k for k in changed)  # trained, with the vision tower frozen


TWO_PROCESS = textwrap.dedent('''
    import sys, torch
    from safetensors.torch import save_file
    from transformers import TrainingArguments
    from accelerate import PartialState
    from mmrlhf.dpo import DPOCollator, MMDPOSettings, MMDPOTrainer, reference_logps
    from mmrlhf.world import world_dpo_examples
    from mmrlhf.logprobs import freeze_vision
    from mmrlhf.testbed import build_tiny_vlm, load_vlm
    out, per_device, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = PartialState(cpu=True)
    examples = [e for e in world_dpo_examples(5, 40) if len(e.pairs) >= 5 and len(e.responses) == 4][:4]
    assert len(examples) == 4
    for e, n in zip(examples, (5, 2, 6, 3)):  # unequal pair counts per query
        e.pairs, e.deltas = e.pairs[:n], e.deltas[:n]
    torch.manual_seed(0)
    policy, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    for e, r in zip(examples, reference_logps(policy, processor, examples)): e.ref_logps = r
    freeze_vision(policy)
    args = TrainingArguments(output_dir=out + "/run", per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
                             max_steps=3, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
                             remove_unused_columns=False, seed=0, disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant")
    trainer = MMDPOTrainer(model=policy, args=args, train_dataset=examples, data_collator=DPOCollator(processor), settings=MMDPOSettings())
    trainer.train()
    if state.is_main_process:
        save_file({k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}, out + "/params.safetensors")
''')


def test_processes_and_accumulation_equal_one_batch(tmp_path):
    "4 queries with 5, 2, 6 and 3 pairs: one batch of 4, 2 x 2 accumulated, and 2 processes x 1 x 2 accumulated give one update."
    script = tmp_path / "train.py"; script.write_text(TWO_PROCESS)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    runs = {"one": ["4", "1"], "accum": ["2", "2"], "two": ["1", "2"]}
    for name in runs: (tmp_path / name).mkdir()
    for name in ("one", "accum"):
        subprocess.run([sys.executable, str(script), str(tmp_path / name), *runs[name]], env=env, check=True, capture_output=True, timeout=600)
    launcher = Path(sys.executable).parent / "accelerate"
    # the gloo backend may abort at exit after the work is done (reference/env-probe.md §5): judge by the output file
    r = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", str(script), str(tmp_path / "two"), *runs["two"]], env=env, capture_output=True, text=True,
                       timeout=600)
    assert (tmp_path / "two" / "params.safetensors").exists(), r.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "params.safetensors"))
    start, _ = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    moved = sum(not torch.equal(v, start.state_dict()[k]) for k, v in a.items())
    assert moved > 10
    bad = {}
    for name in ("accum", "two"):
        b = load_file(str(tmp_path / name / "params.safetensors"))
        bad[name] = [k for k, v in a.items() if not torch.allclose(v, b[k], atol=2e-5, rtol=1e-4)]
    assert not any(bad.values()), {name: f"{len(v)} of {len(a)} tensors differ from one batch, e.g. {v[:2]}" for name, v in bad.items()}


def test_lora_uses_the_disabled_adapter_as_reference(tmp_path):
    data, world = _world(tmp_path, n=6)
    final = run_train_dpo(TrainDPOConfig(data=str(data), image_root=str(world), out=str(tmp_path / "lora"), steps=3, save_steps=3,
                                         batch_size=2, lr=1e-2, lora_r=4, logging_steps=1))
    logs = [h for h in __import__("json").loads((tmp_path / "lora" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"] if "mmdpo/dpo" in h]
    assert logs[0]["mmdpo/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: adapter B = 0, so policy == reference
    start, trained = build_tiny_vlm("llava_onevision", "tiny", seed=0)[0].state_dict(), load_vlm(final)[0].state_dict()
    changed = [k for k, v in start.items() if not torch.equal(v, trained[k])]
    assert changed and all("language_model" in k and "proj" in k for k in changed)  # merged adapters only


def test_ref_logps_two_processes_equal_one(tmp_path):
    data, world = _world(tmp_path, n=7)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = [f"data={data}", f"image_root={world}", "batch_size=2"]
    subprocess.run([sys.executable, "-m", "mmrlhf.cli", "ref-logps", f"out={tmp_path / 'one'}", *args], env=env, check=True, capture_output=True, timeout=600)
    launcher = Path(sys.executable).parent / "accelerate"
    r = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "-m", "mmrlhf.cli", "ref-logps", f"out={tmp_path / 'two'}", *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert (tmp_path / "two" / "queries.jsonl").exists(), r.stderr[-3000:]
    assert len(list((tmp_path / "two" / "ref-shards").glob("rank*.jsonl"))) == 2
    one = [r.ref_logp for q in read_queries(tmp_path / "one" / "queries.jsonl") for r in q.responses]
    two = [r.ref_logp for q in read_queries(tmp_path / "two" / "queries.jsonl") for r in q.responses]
    assert two == pytest.approx(one, rel=1e-5)


def test_online_reference_and_gradient_checkpointing(tmp_path):
    from transformers import TrainingArguments
    from mmrlhf.dpo import MMDPOTrainer
    examples = world_dpo_examples(4, 4)
    policy, processor = build_tiny_vlm("qwen2_vl", "tiny", seed=0)
    reference, _ = build_tiny_vlm("qwen2_vl", "tiny", seed=0)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        response_logps(policy.train(), DPOCollator(processor, layout="shared")(examples[:1]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = MMDPOTrainer(model=policy, args=args, train_dataset=examples, data_collator=DPOCollator(processor, layout="packed"),
                           ref_model=reference)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "mmdpo/dpo" in h]
    assert logs[0]["mmdpo/dpo"] == pytest.approx(math.log(2), abs=1e-5) and logs[1]["mmdpo/dpo"] != pytest.approx(math.log(2), abs=1e-5)


def test_missing_margins_refused_and_beta_reported(tmp_path, capsys):
    "Unscored data: the dynamic rule refuses by default; with missing_delta=fixed the run says δ is absent and β is β_ori."
    from mmrlhf.schema import pair_indices
    scored, world = _world(tmp_path, n=6)
    unscored = tmp_path / "pairs" / "queries.jsonl"  # annotated, never scored: no reward, so no δ
    n_pairs = sum(len(pair_indices(q)) for q in read_queries(unscored) if q.annotated)
    with pytest.raises(DataError) as e:
        run_train_dpo(TrainDPOConfig(data=str(unscored), image_root=str(world), out=str(tmp_path / "x"), steps=1, lora_r=4))
    msg = str(e.value)
    assert f"{n_pairs} of {n_pairs} pairs" in msg and "have no reward margin δ" in msg and "mmrlhf score" in msg and "missing_delta=fixed" in msg
    assert not (tmp_path / "x").exists()
    out = tmp_path / "fixed"
    run_train_dpo(TrainDPOConfig(data=str(unscored), image_root=str(world), out=str(out), steps=2, lora_r=4, batch_size=2,
                                 logging_steps=1, missing_delta="fixed"))
    printed = capsys.readouterr().out
    assert "reward margin δ on 0 (0.0%)" in printed and "min 0.1000, quartiles 0.1000 / 0.1000 / 0.1000, max 0.1000" in printed
    logs = [h for h in __import__("json").loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"] if "mmdpo/dpo" in h]
    assert len(logs) == 2 and all(h["mmdpo/delta_share"] == 0.0 and h["mmdpo/beta_median"] == pytest.approx(0.1) for h in logs)
    # scored data: the opening line gives the share with δ and β's spread, computed here from the rewards
    qs = list(read_queries(scored))
    deltas = [q.responses[c].reward - q.responses[r].reward for q in qs if q.annotated for c, r in pair_indices(q)]
    run_train_dpo(TrainDPOConfig(data=str(scored), image_root=str(world), out=str(tmp_path / "dyn"), steps=1, lora_r=4, batch_size=2))
    printed = capsys.readouterr().out
    betas = sorted(0.1 * (1 + 0.5 * (1 - math.exp(-0.5 * max(d, 0)))) for d in deltas)
    assert f"reward margin δ on {len(deltas)} (100.0%)" in printed
    assert f"min {betas[0]:.4f}" in printed and f"max {betas[-1]:.4f}" in printed


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    "A checkpoint folder with only config.json (a save cut short) is skipped with a warning; the resumed run equals an uninterrupted one."
    import json, shutil
    data, world = _world(tmp_path, n=6)
    def train(out, resume=False):
        return run_train_dpo(TrainDPOConfig(data=str(data), image_root=str(world), out=str(out), steps=4, save_steps=3, batch_size=2,
                                            lr=1e-2, lora_r=4, lora_dropout=0.0, resume=resume))
    straight = load_file(str(train(tmp_path / "a") / "model.safetensors"))
    assert (tmp_path / "a" / "checkpoint-3" / "trainer_state.json").is_file() and not list((tmp_path / "a").glob(".staging/checkpoint-*"))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "final"); shutil.rmtree(b / "checkpoint-4", ignore_errors=True)
    (b / "checkpoint-5").mkdir(); shutil.copy(tmp_path / "a" / "final" / "config.json", b / "checkpoint-5")
    (b / ".final.partial").mkdir(); (b / ".final.partial" / "junk").write_text("x")  # what a save of final/ cut short leaves
    with pytest.warns(UserWarning, match="checkpoint-5"):
        resumed = load_file(str(train(b, resume=True) / "model.safetensors"))
    state = json.loads((b / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (b / ".final.partial").exists()
    assert straight.keys() == resumed.keys()
    for k, v in straight.items(): assert torch.allclose(v, resumed[k], atol=1e-6), k


def test_max_length_rule_counted(tmp_path, capsys):
    "Over-long responses are cut, queries whose prompt alone is over the limit dropped, both counted; a 1 MB question costs no forward."
    import json
    from mmrlhf.testbed import chat_batch
    from mmrlhf.schema import query_medium
    assert RefLogpsConfig().max_length and TrainDPOConfig().max_length == RefLogpsConfig().max_length  # a finite default, the same
    data, world = _world(tmp_path, n=6)
    qs = list(read_queries(data))
    qs[1].question = "how many shapes are there, counting every one of them carefully? " * 30  # ~ 400 tokens of prompt
    qs[2].responses[0].text = "there is one red circle and " * 40  # ~ 280 tokens of response
    write_queries(data, qs)
    max_length = 250
    _, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    lengths = {}  # independent count: each full conversation's length, the response's end
    for q in read_queries(data, world):
        for i, r in enumerate(q.responses):
            enc = chat_batch(processor, [query_medium(q, world)], [q.question], [r.text])
            lengths[q.id, i] = (int((enc["labels"][0] != -100).nonzero()[0]), int((enc["labels"][0] != -100).nonzero()[-1]) + 1)
    dropped = {qid for (qid, _), (s, _) in lengths.items() if s >= max_length}
    cut = sum(e > max_length for (qid, _), (s, e) in lengths.items() if qid not in dropped)
    assert dropped == {qs[1].id} and cut >= 1
    ref_file = run_ref_logps(RefLogpsConfig(data=str(data), image_root=str(world), out=str(tmp_path / "ref"), max_length=max_length))
    printed = capsys.readouterr().out
    assert f"{cut} responses cut from their end, 1 queries dropped" in printed
    report = json.loads((tmp_path / "ref" / "ref-logps-report.json").read_text())
    assert (report["responses_cut"], report["queries_dropped"], report["queries"]) == (cut, [qs[1].id], len(qs))
    out = {q.id: q for q in read_queries(ref_file)}
    assert len(out) == len(qs) and all(r.ref_logp is None for r in out[qs[1].id].responses)
    assert all(isinstance(r.ref_logp, float) for q in out.values() if q.id != qs[1].id for r in q.responses)
    with pytest.raises(ConfigError, match="max_length"):  # the reference was cut at 250: training must cut the same way
        run_train_dpo(TrainDPOConfig(data=str(ref_file), image_root=str(world), out=str(tmp_path / "dpo"), steps=1))
    run_train_dpo(TrainDPOConfig(data=str(ref_file), image_root=str(world), out=str(tmp_path / "dpo"), steps=1, max_length=max_length))
    printed = capsys.readouterr().out
    n_resp = sum(len(q.responses) for q in qs if q.annotated)
    assert f"max_length={max_length}: {cut} of {n_resp} responses cut from their end, 1 of" in printed
    # a 1 MB question: dropped by the default limit before any forward, not a terabyte allocation
    qs[3].question = ("how many red circles are there in the picture " * 25000)[:1_000_000]
    write_queries(data, qs)
    run_ref_logps(RefLogpsConfig(data=str(data), image_root=str(world), out=str(tmp_path / "ref-big")))
    report = json.loads((tmp_path / "ref-big" / "ref-logps-report.json").read_text())
    assert report["queries_dropped"] == [qs[3].id]


def test_ref_logps_refuses_nonfinite(tmp_path):
    "A model that gives NaN log-probabilities: ref-logps stops, naming the query, and writes no data."
    from mmrlhf.testbed import save_vlm
    data, world = _world(tmp_path, n=3)
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    with torch.no_grad(): vlm.lm_head.weight[5] = float("nan")
    save_vlm(vlm, processor, tmp_path / "nan-model")
    first = next(iter(read_queries(data))).id
    with pytest.raises(DataError, match=f"query {first!r}.*not finite"):
        run_ref_logps(RefLogpsConfig(data=str(data), image_root=str(world), model=str(tmp_path / "nan-model"), out=str(tmp_path / "ref")))
    assert not (tmp_path / "ref" / "queries.jsonl").exists()
    shard = tmp_path / "ref" / "ref-shards" / "rank0.jsonl"
    assert not shard.exists() or "NaN" not in shard.read_text()


def test_the_delta_policy_travels_whole():
    "A command's δ policy reaches the loss field by field; unknown rules are refused before any model loads."
    cfg = TrainDPOConfig(beta=0.2, w=0.3, k=0.4, beta_mode="fixed", gamma=0.5, negative_delta="skip",
                         missing_delta="skip")
    s = MMDPOSettings.of(cfg)
    assert s == MMDPOSettings(0.2, 0.3, 0.4, "fixed", 0.5, "skip", "skip")
    for name, value in [("beta_mode", "adaptive"), ("negative_delta", "drop"), ("missing_delta", "ignore")]:
        with pytest.raises(ConfigError, match=f"{name}: expected one of"):
            MMDPOSettings.of(TrainDPOConfig(**{name: value}))
