"""The packed layout (one sequence per query group, block mask) against one sequence per response: log-probabilities,
gradients, checkpointing, mixed K in one row, the reward model, and no [tokens, vocabulary] float32 tensor."""
import pytest
import torch

from mmrlhf.logprobs import encode_groups, logps_and_grads, pack_sequences, response_logps, usable_layout
from mmrlhf.reward import CritiqueRewardModel, reward_batch
from mmrlhf.schema import parse_query
from mmrlhf.testbed import FAMILIES as TESTBED, build_tiny_vlm
from mmrlhf.world import make_query, oracle_annotate, query_media, world_record

# families whose language model has linear-attention layers (stated here, not read from the package): their
# recurrent state runs along the whole row, so only one sequence per response holds
RECURRENT = ("qwen3_5",)
assert set(RECURRENT) <= set(TESTBED)
FAMILIES = [f for f in TESTBED if f not in RECURRENT]


def world_groups(n, ks, seed=0, video=True):
    "Shapes-world queries as (medium, question, the first k responses), k from `ks` (clips only if `video`)."
    qs = [q for q in (make_query(seed, i) for i in range(4 * n)) if video or q.category != "video"][:n]
    return [(query_media(q), q.question, [r["text"] for r in q.responses[:k]]) for q, k in zip(qs, ks)]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout): m.p = 0.0
    return model


def assert_grads_close(ga, gb, what):
    "Every gradient within 1e-4 (absolute + relative to its tensor's scale), same tensors."
    assert ga.keys() == gb.keys() and len(ga) > 10, what
    for n in ga:
        scale = float(ga[n].abs().max())
        assert torch.allclose(ga[n], gb[n], atol=1e-5 + 1e-4 * scale, rtol=1e-4), (what, n)


@pytest.mark.parametrize("family", list(TESTBED))
def test_each_family_gets_a_layout_that_holds(family):
    "Every layout holds on every family but the recurrent ones, which get one sequence per response and a reason."
    vlm, _ = build_tiny_vlm(family, "tiny", seed=1)
    said = []
    for layout in ("packed", "shared", "grouped"):
        assert usable_layout(vlm, layout, said.append) == ("grouped" if family in RECURRENT else layout)
    if family in RECURRENT:
        assert len(said) == 2 and all("'linear_attention' layers" in s and "using grouped" in s for s in said), said
    else:
        assert said == []


@pytest.mark.parametrize("family", RECURRENT)
def test_recurrent_family_batch_equals_each_response_alone(family):
    "One sequence per response, right-padded in one batch: log-probs and gradients equal each response run alone."
    vlm, processor = build_tiny_vlm(family, "tiny", seed=1)
    no_dropout(vlm).train()
    groups = world_groups(3, (3, 1, 2))
    weights = torch.linspace(-1, 1, 6)
    want, g_want = logps_and_grads(vlm, encode_groups(processor, groups, layout="grouped"), weights)
    alone, g_alone, i = [], {}, 0
    for medium, question, responses in groups:
        for r in responses:
            lp, g = logps_and_grads(vlm, encode_groups(processor, [(medium, question, [r])], layout="grouped"),
                                    weights[i:i + 1])
            alone.append(lp[0]); i += 1
            for n, v in g.items(): g_alone[n] = g_alone.get(n, 0) + v
    assert torch.allclose(torch.stack(alone), want, atol=1e-4, rtol=1e-5)
    assert_grads_close(g_want, g_alone, family)
    with pytest.raises(ValueError, match="'linear_attention' attention layers"):   # packed, asked directly
        response_logps(vlm, encode_groups(processor, groups))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_one_sequence_per_response(family, checkpointing):
    "Queries of 3, 1, 4 and 2 responses: one query per row, and all four in one row; float32, tolerance 1e-4."
    vlm, processor = build_tiny_vlm(family, "tiny", seed=1)
    no_dropout(vlm).train()
    groups = world_groups(4, (3, 1, 4, 2), video=bool(TESTBED[family]["video_placeholder"]))
    weights = torch.linspace(-1, 1, 10)
    want, g_want = logps_and_grads(vlm, encode_groups(processor, groups, layout="grouped"), weights)
    if checkpointing: vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for pack_tokens in (None, 100_000):
        batch = encode_groups(processor, groups, pack_tokens=pack_tokens)
        assert batch["packed"]["input_ids"].shape[0] == (4 if pack_tokens is None else 1)
        got, g_got = logps_and_grads(vlm, batch, weights)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
        assert_grads_close(g_want, g_got, (family, checkpointing, pack_tokens))
    n = encode_groups(processor, groups)["n_tokens"]
    assert torch.equal(n, encode_groups(processor, groups, layout="grouped")["full"]["labels"].ne(-100).sum(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_gives_the_same_logps(family):
    "Prefix-shared and packed log-probabilities equal one sequence per response, groups of 3, 1, 4 and 2 responses."
    vlm, processor = build_tiny_vlm(family, "tiny", seed=1)
    groups = world_groups(4, (3, 1, 4, 2), video=bool(TESTBED[family]["video_placeholder"]))
    with torch.no_grad():
        want = response_logps(vlm, encode_groups(processor, groups, layout="grouped"))[0]
        for layout in ("shared", "packed"):
            got = response_logps(vlm, encode_groups(processor, groups, layout=layout))[0]
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (layout, (got - want).abs().max())


def test_packed_positions_follow_each_sequence():
    "Qwen2-VL's 3-D positions of every packed token equal those the token has in its own full sequence."
    from mmrlhf.logprobs import _rope_owner, packed_positions
    vlm, processor = build_tiny_vlm("qwen2_vl", "tiny", seed=0)
    groups = world_groups(2, (3, 2))
    full = encode_groups(processor, groups, layout="grouped")["full"]
    kw = {k: full[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in full}
    own, _ = _rope_owner(vlm).get_rope_index(full["input_ids"], attention_mask=full["attention_mask"], **kw)
    batch = encode_groups(processor, groups, pack_tokens=100_000)
    pos, pk = packed_positions(vlm, batch), batch["packed"]
    assert pos.shape[0] == 3 and int((own[0] != own[1]).sum()) > 0   # the image's positions are really 3-D
    checked = 0
    for t in range(pk["input_ids"].shape[1]):
        seg, src = int(pk["seg"][0, t]), int(pk["src"][0, t])
        if seg == -2: continue
        rows = [seg] if seg >= 0 else [i for i in range(5) if int(batch["query_index"][i]) == int(pk["doc"][0, t])]
        for i in rows:
            assert torch.equal(pos[:, 0, t], own[:, i, src]), (t, i); checked += 1
    assert checked > 100


def test_media_after_the_shared_part_is_refused():
    "A group whose sequences differ before an image token cannot share the image: refused, naming the query."
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    groups = world_groups(1, (2,))
    b = encode_groups(processor, groups, layout="grouped")["full"]
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    first_image = int((b["input_ids"][1] == image).nonzero()[0])
    b["input_ids"][1, first_image - 1] += 1           # the second sequence now differs just before its image
    spans = [(int(r.nonzero()[0]), int(r.nonzero()[-1]) + 1) for r in b["labels"].ne(-100)]
    with pytest.raises(ValueError, match="query 0: image or video tokens after"):
        pack_sequences(processor, b, b, spans, [0, 0])


def _saved_float32(fn, at_least):
    "Sizes of the float32 tensors autograd saves for backward while `fn` runs, those of `at_least` elements or more."
    saved = []
    def keep(t):
        if t.dtype == torch.float32 and t.numel() >= at_least: saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t): out = fn()
    return out, saved


def test_no_float32_logits_tensor():
    "Under autograd, nothing the packed step saves for backward is as large as [scored tokens, vocabulary] in float32."
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    groups = [(m, q, [" ".join([r] * 8) for r in rs]) for m, q, rs in world_groups(3, (4, 4, 4))]
    batch = encode_groups(processor, groups)
    n_tok, vocab = int(batch["n_tokens"].sum()), vlm.get_output_embeddings().weight.shape[0]
    assert n_tok * vocab > 4 * max(p.numel() for p in vlm.parameters())   # larger than any weight
    (lp, _), big = _saved_float32(lambda: response_logps(vlm, batch), n_tok * vocab)
    assert not big, big
    lp.sum().backward()
    # the detector sees the plain formula's log-softmax
    full = dict(encode_groups(processor, groups, layout="grouped")["full"]); full.pop("labels")
    _, plain = _saved_float32(lambda: vlm(**full).logits.log_softmax(-1), n_tok * vocab)
    assert plain


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("with_critiques", [True, False])
def test_reward_packed_equals_grouped(family, with_critiques):
    "The reward model's rewards, critique cross-entropies and gradients: packed = one sequence per response."
    vlm, processor = build_tiny_vlm(family, "tiny", seed=2)
    rm = CritiqueRewardModel(no_dropout(vlm)).train()
    data = []
    for i, k in enumerate((3, 1, 4)):
        q = make_query(1, i)
        a = oracle_annotate(parse_query(world_record(q, [f"images/{q.id}.png"])))
        crit = [" ".join(r.reasons.values()) for r in a.responses[:k]] if with_critiques else None
        data.append((query_media(q), a.question, [r.text for r in a.responses[:k]], crit))
    def run(layout, pack_tokens=None):
        rm.zero_grad()
        enc, _ = reward_batch(processor, data, layout=layout, pack_tokens=pack_tokens)
        ce, rewards = rm(**enc)
        w = torch.linspace(-1, 1, len(rewards))
        loss = (rewards * w).sum() + (torch.nan_to_num(ce) * w.flip(0)).sum()
        loss.backward()
        return ce.detach(), rewards.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    ce0, r0, g0 = run("grouped")
    assert torch.isnan(ce0).all() != with_critiques
    for pack_tokens in (None, 100_000):
        ce1, r1, g1 = run("packed", pack_tokens)
        assert torch.allclose(r0, r1, atol=1e-5) and torch.allclose(ce0, ce1, atol=1e-5, equal_nan=True)
        assert_grads_close(g0, g1, (family, with_critiques, pack_tokens))


ZERO3 = r'''
import json, os, sys, torch
import deepspeed
from safetensors.torch import save_file
from mmrlhf.logprobs import encode_groups, response_logps
from mmrlhf.testbed import build_tiny_vlm
from mmrlhf.world import make_query, query_media
out, family = sys.argv[1], sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
vlm, processor = build_tiny_vlm(family, "tiny", seed=3)
for m in vlm.modules():
    if isinstance(m, torch.nn.Dropout): m.p = 0.0
vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
# images only: under ZeRO-3 every rank must run the same modules, and a clip takes the video path
qs = [make_query(0, i) for i in (0, 1, 3, 4)]
groups = [(query_media(q), q.question, [r["text"] for r in q.responses[:k]]) for q, k in zip(qs, (3, 2, 4, 1))]
mine = groups[rank::world]
config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
          "gradient_clipping": 0.0, "steps_per_print": 10**9}
opt = torch.optim.SGD(vlm.parameters(), lr=1.0)
engine, *_ = deepspeed.initialize(model=vlm, optimizer=opt, config=config)
engine.train()
batch = encode_groups(processor, mine, pack_tokens=100_000)
lp, _ = response_logps(engine, batch)
starts = [sum(len(h[2]) for h in groups[:j]) for j in range(len(groups))]
idx = [starts[j] + i for j in range(rank, len(groups), world) for i in range(len(groups[j][2]))]
weights = torch.linspace(-1, 1, 10)
loss = (lp * weights[idx]).sum() * world   # DeepSpeed averages over ranks: the sum over all queries
engine.backward(loss); engine.step()
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    if rank == 0:
        save_file({n: p.detach().clone().contiguous() for n, p in engine.module.named_parameters()}, out + "/params.safetensors")
        json.dump({"logps": lp.tolist(), "idx": idx}, open(out + "/rank0.json", "w"))
torch.distributed.barrier()
os._exit(0)
'''


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_zero3_packed_checkpointed_step_equals_plain(tmp_path, family):
    "Two ranks under DeepSpeed ZeRO-3, packed and checkpointed: one SGD step equals one plain step on all queries, grouped layout."
    pytest.importorskip("deepspeed")
    import os, subprocess, sys
    from pathlib import Path
    from safetensors.torch import load_file
    script = tmp_path / "zero3.py"; script.write_text(ZERO3)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path), family], env=env,
                       capture_output=True, text=True, timeout=900)
    assert (tmp_path / "params.safetensors").exists(), (r.stdout[-2000:], r.stderr[-4000:])
    got = load_file(str(tmp_path / "params.safetensors"))
    # the same step by hand: one process, grouped layout, no checkpointing, plain SGD with lr 1
    vlm, processor = build_tiny_vlm(family, "tiny", seed=3)
    no_dropout(vlm).train()
    qs = [make_query(0, i) for i in (0, 1, 3, 4)]
    groups = [(query_media(q), q.question, [r["text"] for r in q.responses[:k]]) for q, k in zip(qs, (3, 2, 4, 1))]
    start = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    lp, _ = response_logps(vlm, encode_groups(processor, groups, layout="grouped"))
    (lp * torch.linspace(-1, 1, 10)).sum().backward()
    moved, bad = 0, []
    for n, p in vlm.named_parameters():
        want = start[n] - (p.grad if p.grad is not None else 0)
        moved += not torch.equal(want, start[n])
        if not torch.allclose(got[n], want, atol=1e-5, rtol=1e-4): bad.append(n)
    assert moved > 10 and not bad, (moved, bad[:5])
