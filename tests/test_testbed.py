"Tiny VLMs of every family: forward, backward, generate, and an exact round trip through disk."
import inspect

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmrlhf.synthetic import make_query, query_media
from mmrlhf.testbed import FAMILIES, build_tiny_vlm, chat_batch, generate_text, load_vlm, save_vlm

QUERIES = [make_query(5, i) for i in range(40)]
IMAGE_Q = next(q for q in QUERIES if q.category == "long")
VIDEO_Q = next(q for q in QUERIES if q.category == "video")


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    return (request.param, *build_tiny_vlm(request.param, "tiny", seed=1))


def _batch(processor):
    qs = [IMAGE_Q, VIDEO_Q]
    return chat_batch(processor, [query_media(q) for q in qs], [q.question for q in qs], [q.reference for q in qs])


def test_forward_backward_reaches_vision_tower(tiny):
    family, model, processor = tiny
    model.zero_grad()
    out = model.train()(**_batch(processor))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision = [p.grad for n, p in model.named_parameters() if "patch_embed" in n]
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
    enc, enc2 = _batch(processor), _batch(loaded_proc)
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
