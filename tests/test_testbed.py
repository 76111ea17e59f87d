"Tiny VLMs of every family: forward, backward, generate, and an exact round trip through disk."
import inspect

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmrlhf.world import make_query, query_media
from mmrlhf.models import chat_batch, generate_text, load_vlm, save_vlm
from mmrlhf.testbed import FAMILIES, build_tiny_vlm

QUERIES = [make_query(5, i) for i in range(40)]
IMAGE_Q = next(q for q in QUERIES if q.category == "long")
VIDEO_Q = next(q for q in QUERIES if q.category == "video")


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    return (request.param, *build_tiny_vlm(request.param, "tiny", seed=1))


def _batch(family, processor):
    "An image and a clip where the family takes video; two images where it does not."
    qs = [IMAGE_Q, VIDEO_Q if FAMILIES[family]["video_placeholder"] else IMAGE_Q]
    return chat_batch(processor, [query_media(q) for q in qs], [q.question for q in qs], [q.reference for q in qs])


def test_forward_backward_reaches_vision_tower(tiny):
    family, model, processor = tiny
    model.zero_grad()
    out = model.train()(**_batch(family, processor))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision = [p.grad for n, p in model.named_parameters() if "patch_embed" in n or "patch_conv" in n]
    assert vision and all(g is not None and g.abs().sum() > 0 for g in vision)
    model.eval()


def test_generate_returns_text(tiny):
    _, model, processor = tiny
    answers = generate_text(model, processor, [query_media(IMAGE_Q), None], [IMAGE_Q.question, "Hello"], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_round_trip_is_exact_through_auto_classes(tiny, tmp_path):
    family, model, processor = tiny
    save_vlm(model, processor, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    loaded_proc = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(model) and type(loaded_proc) is type(processor)
    enc, enc2 = _batch(family, processor), _batch(family, loaded_proc)
    for k in enc: assert torch.equal(enc[k], enc2[k]), k
    with torch.no_grad():
        assert torch.equal(model.eval()(**enc).logits, loaded(**enc2).logits)


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_tiny_vlm("qwen2_vl", "tiny", seed=3)
    b, _ = build_tiny_vlm("qwen2_vl", "tiny", seed=3)
    c, _ = build_tiny_vlm("qwen2_vl", "tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_loader_is_local_only_and_remote_code_off(tmp_path):
    assert inspect.signature(load_vlm).parameters["trust_remote_code"].default is False
    with pytest.raises(FileNotFoundError, match="no local model folder"):
        load_vlm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_vlm("org/some-hub-model")  # a hub id is not a local folder: refused, never fetched


def test_bf16_load_generates(tmp_path):
    model, processor = build_tiny_vlm("llava_onevision", "tiny")
    save_vlm(model, processor, tmp_path)
    m, p = load_vlm(tmp_path, dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    assert len(generate_text(m, p, [query_media(IMAGE_Q)], [IMAGE_Q.question], max_new_tokens=3)) == 1


def test_labels_cover_only_the_answer():
    _, processor = build_tiny_vlm("qwen2_5_vl", "tiny")
    qs = QUERIES[:6]
    enc = chat_batch(processor, [query_media(q) for q in qs], [q.question for q in qs], [q.reference for q in qs])
    for row, q in zip(enc["labels"], qs):
        assert processor.tokenizer.decode(row[row != -100]) == q.reference + "<|im_end|>"


def _prompts():
    qs = [q for q in QUERIES if q.category != "video"][:4]
    return [query_media(q) for q in qs], [q.question for q in qs]


def test_sampling_takes_a_seed_not_the_global_generator():
    model, processor = build_tiny_vlm("llava_onevision", "tiny", seed=0)
    media, prompts = _prompts()
    def sample(seed, batch_size=4):
        torch.manual_seed(len(prompts) * 1000 + batch_size)  # the global generator must play no part
        return generate_text(model, processor, media, prompts, 8, batch_size, temperature=1.0, seed=seed)
    first = sample(0)
    assert sample(0) == first and sample(0, batch_size=1) == first   # same seed: same text, whatever the batches
    other = sample(1)
    assert other != first and sum(a != b for a, b in zip(first, other)) >= 2   # another seed: other draws
    assert generate_text(model, processor, media[:1], prompts[:1], 8, temperature=1.0, seeds=[123]) == \
        generate_text(model, processor, media[:1], prompts[:1], 8, temperature=1.0, seeds=[123])


def _argmax_decode(model, processor, prompt, n):
    "Greedy decoding written out: the arg max of the logits, one forward pass over the whole sequence a step."
    ids = chat_batch(processor, [None], [prompt])["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if int(nxt) == processor.tokenizer.eos_token_id: break
    return processor.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_a_checkpoints_decoding_defaults_are_not_applied():
    "Qwen2-VL-Instruct ships do_sample with top_k=1 (and a tiny temperature and top_p): our settings win over them."
    from transformers import GenerationConfig
    model, processor = build_tiny_vlm("qwen2_vl", "tiny", seed=2)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.01, top_p=0.001,
                                               top_k=1, repetition_penalty=1.05)
    prompts = ["What is in the picture?", "Name the shapes.", "How many circles are there?"]
    draws = [generate_text(model, processor, [None] * 3, prompts, 8, temperature=1.0, seed=s) for s in range(3)]
    assert draws[0] != draws[1] != draws[2] != draws[0]   # it samples: top_k=1 would make every draw the arg max
    greedy = generate_text(model, processor, [None] * 3, prompts, 8)
    assert greedy == [_argmax_decode(model, processor, p, 8) for p in prompts]   # no repetition penalty either
    assert model.generation_config.top_k == 1   # the model's own config is left as it was


@pytest.mark.parametrize("family", [f for f in FAMILIES if not FAMILIES[f]["video_placeholder"]])
def test_image_only_family_refuses_a_clip(family):
    _, processor = build_tiny_vlm(family, "tiny")
    with pytest.raises(ValueError, match="takes images only: it has no video processor"):
        chat_batch(processor, [query_media(VIDEO_Q)], [VIDEO_Q.question], [VIDEO_Q.reference])
