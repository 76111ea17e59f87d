"""`mmrlhf convert-release-rm` on a tiny checkpoint written here in the release's `llava_qwen` layout (its tensor
names, its config fields, sharded safetensors): every tensor lands where the release's model code says it belongs,
the converted reward equals a forward computed by hand from the original tensors, anything that does not match is
refused with the offending names, and `mmrlhf score` runs on the converted folder."""
import contextlib
import io
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2Model

from mmrlhf.cli import main
from mmrlhf.core import DataError
from mmrlhf.formats import PairsConfig, run_pairs
from mmrlhf.reward import (RELEASE_PROMPT, RELEASE_SYSTEM, CritiqueRewardModel, ScoreConfig,
                           convert_release_rm, critique_prompt, reward_batch, run_score)
from mmrlhf.schema import read_queries
from mmrlhf.testbed import train_tokenizer
from mmrlhf.world import SynthConfig, world_texts, write_world

# the tiny release model (the real one: 3584 wide, 28 layers, 28 heads of which 4 kv; SigLIP 1152 wide, 26 layers)
H, INTER, LAYERS, HEADS, KV = 64, 96, 2, 4, 2
W, V_INTER, V_LAYERS, V_HEADS, PATCH, TILE = 32, 48, 2, 2, 8, 32
TOWER = "model.vision_tower.vision_tower.vision_model."
SPARE = 14  # embedding rows past the tokenizer, as Qwen2's 152064 rows past its 151646 tokens


def release_shapes(vocab: int) -> dict:
    "Every tensor of the release's LlavaQwenForCausalLM with is_rm, as it saves them, with its shape."
    kv = KV * H // HEADS
    s = {"model.embed_tokens.weight": (vocab, H), "model.norm.weight": (H,), "lm_head.weight": (vocab, H),
         "model.image_newline": (H,),
         "model.mm_projector.0.weight": (H, W), "model.mm_projector.0.bias": (H,),
         "model.mm_projector.2.weight": (H, H), "model.mm_projector.2.bias": (H,),
         "rm_head.dense.weight": (H, H), "rm_head.dense.bias": (H,),
         "rm_head.out_proj.weight": (1, H), "rm_head.out_proj.bias": (1,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.q_proj.bias": (H,),
                  p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
                  p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
                  p + "self_attn.o_proj.weight": (H, H),
                  p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
                  p + "mlp.down_proj.weight": (H, INTER),
                  p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    s.update({TOWER + "embeddings.patch_embedding.weight": (W, 3, PATCH, PATCH),
              TOWER + "embeddings.patch_embedding.bias": (W,),
              TOWER + "embeddings.position_embedding.weight": ((TILE // PATCH) ** 2, W),
              TOWER + "post_layernorm.weight": (W,), TOWER + "post_layernorm.bias": (W,)})
    for i in range(V_LAYERS):  # the layers the release keeps (it drops SigLIP's last one when it loads)
        p = f"{TOWER}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"): s.update({p + n + ".weight": (W,), p + n + ".bias": (W,)})
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.update({p + f"self_attn.{n}.weight": (W, W), p + f"self_attn.{n}.bias": (W,)})
        s.update({p + "mlp.fc1.weight": (V_INTER, W), p + "mlp.fc1.bias": (V_INTER,),
                  p + "mlp.fc2.weight": (W, V_INTER), p + "mlp.fc2.bias": (W,)})
    return s


def release_config(tok, vocab: int) -> dict:
    "config.json as the release writes it: Qwen2's fields, LLaVA-NeXT's mm_* fields, is_rm."
    return {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "attention_dropout": 0.0,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "hidden_act": "silu", "hidden_size": H, "intermediate_size": INTER, "initializer_range": 0.02,
            "max_position_embeddings": 4096, "max_window_layers": LAYERS, "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_scaling": None,
            "rope_theta": 1000000.0, "sliding_window": 4096, "use_sliding_window": False,
            "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": vocab,
            "image_aspect_ratio": "anyres_max_9", "image_crop_resolution": None,
            "image_grid_pinpoints": [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
            "image_split_resolution": None, "mm_hidden_size": W, "mm_newline_position": "one_token",
            "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
            "mm_resampler_type": None, "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2,
            "mm_tunable_parts": "mm_mlp_adapter,mm_language_model", "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
            "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_tower_lr": 2e-6,
            "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right", "use_mm_proj": True,
            "vision_tower_pretrained": None, "is_rm": True, "transformers_version": "4.40.0.dev0"}


def write_release(folder, tensors: dict, config: dict, tok):
    "The checkpoint in two safetensors shards with their index, the tokenizer and config.json."
    folder.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k.startswith("model.layers.")}}
    shards["model-00002-of-00002.safetensors"] = {k: v for k, v in tensors.items()
                                                  if k not in shards["model-00001-of-00002.safetensors"]}
    for name, part in shards.items(): save_file(part, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    "A tiny release checkpoint (random weights), and its tensors as written."
    d = tmp_path_factory.mktemp("release")
    tok = train_tokenizer(world_texts(0, 200), 600)   # Qwen2's tokenizer has no <image> or <video>
    vocab = len(tok) + SPARE
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, shape in release_shapes(vocab).items():
        t = torch.randn(shape, generator=g) * (0.5 if len(shape) == 1 else 0.15)
        tensors[k] = t + 1.0 if ("norm" in k and k.endswith("weight")) else t
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(H // HEADS // 2)  # kept by some checkpoints
    write_release(d / "ckpt", tensors, release_config(tok, vocab), tok)
    return d, tensors


@pytest.fixture(scope="module")
def converted(release):
    "The checkpoint converted through the command line, and loaded as our reward model."
    d, _ = release
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert-release-rm", "--checkpoint", str(d / "ckpt"), "--out", str(d / "rm"),
                     "--vision-heads", str(V_HEADS)]) == 0
    assert "converted" in out.getvalue()
    return (d / "rm", *CritiqueRewardModel.from_pretrained(d / "rm"))


def destination(name: str) -> tuple:
    "Where the release's model code puts each tensor, stated here: (our part, its name there)."
    if name.startswith("rm_head."):  # RewardHead: dense (h x h), tanh, out_proj (1 x h)
        _, layer, kind = name.split(".")
        return "head", {"dense": "net.1", "out_proj": "net.4"}[layer] + "." + kind
    if name.startswith(TOWER):  # SigLIP's vision_model inside LLaVA-NeXT's tower wrapper
        return "vlm", "model.vision_tower." + name[len(TOWER):]
    if name.startswith("model.mm_projector."):  # nn.Sequential(Linear, GELU, Linear)
        _, _, index, kind = name.split(".")
        return "vlm", f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{kind}"
    if name in ("model.image_newline", "lm_head.weight"): return "vlm", name
    assert name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")), name
    return "vlm", "model.language_model." + name[len("model."):]


def test_every_tensor_lands_where_it_belongs(release, converted):
    _, tensors = release
    out, model, _ = converted
    ours = {"vlm": model.vlm.state_dict(), "head": model.head.state_dict()}
    used = {"vlm": set(), "head": set()}
    for name, value in tensors.items():
        if name.endswith("rotary_emb.inv_freq"): continue   # a buffer, rebuilt from the config
        part, key = destination(name)
        assert key in ours[part], (name, key)
        assert torch.equal(ours[part][key].to(value.dtype), value), name
        used[part].add(key)
    assert used["head"] == set(ours["head"])
    assert used["vlm"] == set(ours["vlm"]), sorted(set(ours["vlm"]) - used["vlm"])[:5]
    rc = json.loads((out / "reward_config.json").read_text())
    assert (rc["template"], rc["system"], rc["hidden"]) == (RELEASE_PROMPT, RELEASE_SYSTEM, H)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


def siglip_by_hand(pixels, t):
    "The release's tower on one tile: patch and position embeddings, its kept layers, no post-layernorm."
    x = F.conv2d(pixels[None], t[TOWER + "embeddings.patch_embedding.weight"],
                 t[TOWER + "embeddings.patch_embedding.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = x + t[TOWER + "embeddings.position_embedding.weight"]
    d = W // V_HEADS
    for i in range(V_LAYERS):
        p = f"{TOWER}encoder.layers.{i}."
        lin = lambda y, n: F.linear(y, t[p + n + ".weight"], t[p + n + ".bias"])
        y = F.layer_norm(x, (W,), t[p + "layer_norm1.weight"], t[p + "layer_norm1.bias"], 1e-6)
        q, k, v = (lin(y, f"self_attn.{n}_proj").view(1, -1, V_HEADS, d).transpose(1, 2) for n in "qkv")
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(1, -1, W), "self_attn.out_proj")
        y = F.layer_norm(x, (W,), t[p + "layer_norm2.weight"], t[p + "layer_norm2.bias"], 1e-6)
        x = x + lin(F.gelu(lin(y, "mlp.fc1"), approximate="tanh"), "mlp.fc2")
    return x[0]


def test_reward_equals_a_forward_by_hand(release, converted):
    _, t = release
    _, model, processor = converted
    img = Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(1)) * 255)
                          .to(torch.uint8).numpy())
    question, answer, critique = "What colour is the circle?", "The circle is red.", "Correct and clear."
    enc, _ = reward_batch(processor, [(img, question, [answer], [critique])], RELEASE_PROMPT, RELEASE_SYSTEM)
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    # the text is the release's qwen_1_5 conversation, the image where its <image> was
    text = processor.tokenizer.decode(ids[ids != image_id])
    want = (f"<|im_start|>system\n{RELEASE_SYSTEM}<|im_end|>\n<|im_start|>user\n\n"
            f"{critique_prompt(question, answer, RELEASE_PROMPT)}<|im_end|>\n<|im_start|>assistant\n"
            f"{critique}<|im_end|>\n")
    assert text == want, text
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.vlm.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad(): _, reward = model(**enc)
    hook.remove()
    embeds = seen["embeds"][0]
    is_image = ids == image_id
    # text positions: the release's embedding rows; the image's first tokens: its whole-image tile
    torch.testing.assert_close(embeds[~is_image], t["model.embed_tokens.weight"][ids[~is_image]])
    with torch.no_grad():
        f = siglip_by_hand(enc["pixel_values"][0, 0], t)
        f = F.linear(F.gelu(F.linear(f, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"])),
                     t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
    base = (TILE // PATCH) ** 2
    assert int(is_image.sum()) > base     # anyres: the tiles and their newlines follow
    torch.testing.assert_close(embeds[is_image][:base], f, atol=1e-5, rtol=1e-4)
    assert any(torch.allclose(e, t["model.image_newline"]) for e in embeds[is_image][base:])
    # the language model: a plain Qwen2 built from the release's tensors; the head on its last state
    qwen = Qwen2Model(Qwen2Config(vocab_size=t["model.embed_tokens.weight"].shape[0], hidden_size=H,
                                  intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_key_value_heads=KV, rms_norm_eps=1e-6, max_position_embeddings=4096,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    lm = {k[len("model."):]: v for k, v in t.items()
          if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) and "inv_freq" not in k}
    qwen.load_state_dict(lm, strict=True)
    with torch.no_grad():
        h = qwen(inputs_embeds=seen["embeds"], attention_mask=enc["attention_mask"]).last_hidden_state
        last = h[0, int(mask.sum()) - 1]
        r = F.linear(torch.tanh(F.linear(last, t["rm_head.dense.weight"], t["rm_head.dense.bias"])),
                     t["rm_head.out_proj.weight"], t["rm_head.out_proj.bias"])
    torch.testing.assert_close(reward, r, atol=1e-5, rtol=1e-4)
    assert abs(float(r)) > 1e-3      # a reward that says something, not a zero that matches anything


def variant(release, tmp_path, drop=(), add=None, reshape=None, config=None, set_config=None):
    "A copy of the release checkpoint with tensors dropped, added or reshaped, or config fields removed or set."
    d, tensors = release
    t = {k: v for k, v in tensors.items() if k not in drop}
    t.update(add or {})
    for k, shape in (reshape or {}).items(): t[k] = torch.zeros(shape)
    cfg = json.loads((d / "ckpt" / "config.json").read_text())
    for k in config or (): cfg.pop(k)
    cfg.update(set_config or {})
    folder = tmp_path / "bad"
    write_release(folder, t, cfg, train_tokenizer(world_texts(0, 200), 600))
    return folder


@pytest.mark.parametrize("change, names", [
    (dict(drop=("model.layers.1.mlp.down_proj.weight", "rm_head.dense.bias")),
     ["2 missing", "model.layers.1.mlp.down_proj.weight", "rm_head.dense.bias"]),
    (dict(add={"model.mm_projector.1.weight": torch.zeros(2), "rm_head.score.weight": torch.zeros(1, H),
               TOWER + "head.probe": torch.zeros(1, 1, W)}),
     ["3 unexpected", "model.mm_projector.1.weight", "rm_head.score.weight", TOWER + "head.probe"]),
    (dict(reshape={"rm_head.out_proj.weight": (2, H), TOWER + "encoder.layers.1.mlp.fc2.weight": (W, 7)}),
     ["2 wrong shape", f"rm_head.out_proj.weight (2, {H}) (expected (1, {H}))",
      f"{TOWER}encoder.layers.1.mlp.fc2.weight ({W}, 7) (expected ({W}, {V_INTER}))"]),
    (dict(config=("mm_projector_type", "is_rm")), ["missing field 'mm_projector_type'", "missing field 'is_rm'"]),
    (dict(set_config={"mm_newline_position": "grid", "image_aspect_ratio": "pad"}),
     ["mm_newline_position is 'grid', expected one_token", "image_aspect_ratio is 'pad', expected anyres_max_N"]),
])
def test_a_mismatch_is_refused_with_its_names(release, tmp_path, change, names):
    folder = variant(release, tmp_path, **change)
    with pytest.raises(DataError) as e: convert_release_rm(folder, tmp_path / "out", vision_heads=V_HEADS)
    assert all(n in str(e.value) for n in names), str(e.value)
    assert not (tmp_path / "out").exists()


def test_pickle_weights_are_refused_unread(release, tmp_path):
    d, _ = release
    folder = tmp_path / "pickled"; folder.mkdir()
    shutil.copy(d / "ckpt" / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: it must never be opened as one")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["convert-release-rm", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "pytorch_model.bin: pickle files are never loaded" in err.getvalue(), err.getvalue()
    assert not (tmp_path / "out").exists()


def test_score_runs_on_the_converted_model(converted, tmp_path):
    out, _, _ = converted
    write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=3, seed=2))
    run_pairs(PairsConfig(input=str(tmp_path / "world" / "queries.jsonl"), out=str(tmp_path / "pairs"),
                          oracle=True, groups=False))
    result = run_score(ScoreConfig(data=str(tmp_path / "pairs" / "queries.jsonl"), image_root=str(tmp_path / "world"),
                                   model=str(out), out=str(tmp_path / "scored"), max_new_tokens=4))
    assert result["queries"] == 3 and result["rejected"] == 0 and result["pairs"] > 0
    qs = list(read_queries(tmp_path / "scored" / "queries.jsonl"))
    rewards = [r.reward for q in qs for r in q.responses]
    assert rewards and all(isinstance(v, float) and math.isfinite(v) for v in rewards)
    assert len(set(rewards)) > 1       # responses are told apart
    assert all(r.critique is not None for q in qs for r in q.responses)
