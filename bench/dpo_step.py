"""DPO training-step throughput and memory on a Qwen2-VL-shaped VLM: TRL's DPOTrainer vs our grouped, prefix-shared and packed steps.

One run, one model shape (random weights, same seed for every method), the same synthetic data; each method runs in its
own process (so each one's peak memory is its own):

- `trl`: TRL DPOTrainer (sigmoid DPO), `--trl-batch` pairs per device step (default: as many pairs as one of our steps, so
  memory compares at equal pairs per step), reference model online (TRL cannot precompute reference log-probs for VLMs);
- `grouped`: a step takes `--queries-per-step` queries with their K responses, one sequence per response, reference
  log-probs precomputed by a separate reference pass (timed on its own), all K(K-1)/2 pairs' losses from the K log-probs;
- `shared`: the same, but image + prompt encoded once per query and the K responses continued from its KV cache (cannot
  run under gradient checkpointing: skipped with `--grad-checkpointing`);
- `packed`: one sequence per query, [image + prompt | r1 | ... | rK] under a block mask (the default layout of mmrlhf).

`--grad-checkpointing` turns activation checkpointing on for every method, TRL included, in the same way
(`mmrlhf.logprobs.enable_checkpointing`: non-reentrant, without transformers' input-gradient hooks, which would otherwise
backpropagate through the frozen vision tower). The vision tower is frozen in every method (the paper's setting and
`mmrlhf train-dpo`'s default) unless `--train-vision`. Every step is timed from a
batch already collated on the host (TRL: `on_step_begin` -> `on_step_end`; ours: move to device, forward, loss,
backward, grad clip 1.0, AdamW, zero_grad), with `torch.cuda.synchronize`. bf16 autocast over fp32 weights on GPU, fp32
on CPU; fused AdamW for every method. Memory: CUDA peak on a GPU; on CPU the process's peak RSS and, sampled every 5 ms,
the RSS rise during the timed steps over the RSS just before them (`step_rss_gib`, activations and gradients).

Beside the measured ratios it prints the token-count limit: per pair TRL runs 2 policy sequences of P + R tokens through
forward and backward (3 passes each) and 2 through the reference, 8 (P + R); one packed forward and backward of P + K R
tokens serves K(K-1)/2 pairs, so the ratio is 4 K (K - 1) (P + R) / (3 (P + K R)) (16 (P + R) / (P + 4 R) at K = 4).
It counts language-model tokens only: the vision tower, quadratic attention and TRL's per-step overheads add to it.

    PYTHONPATH=. python bench/dpo_step.py --preset cpu --out runs/bench-dpo/cpu.json
    PYTHONPATH=. python bench/dpo_step.py --preset cpu-long --grad-checkpointing --out runs/bench-dpo/cpu-long-gc.json
    PYTHONPATH=. python bench/dpo_step.py --preset gpu --out runs/bench-dpo/gpu.json
    PYTHONPATH=. python bench/dpo_step.py --preset gpu --dry       # build the GPU shape, one tiny step per method
"""
from __future__ import annotations

import argparse, contextlib, copy, datetime, gc, itertools, json, os, platform, random, resource, statistics
import subprocess, sys, tempfile, threading, time, warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import mmrlhf  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is the folder above bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrlhf.logprobs import enable_checkpointing, encode_groups, freeze_vision, response_logps
from mmrlhf.testbed import chatml_template, train_tokenizer

from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)

QWEN_TOKENS = ('<|vision_start|>', '<|vision_end|>', '<|image_pad|>', '<|video_pad|>')
QWEN_IMG, QWEN_VID = '<|vision_start|><|image_pad|><|vision_end|>', '<|vision_start|><|video_pad|><|vision_end|>'

# text: hidden/intermediate/layers/heads/kv_heads; vision: v_hidden (embed_dim)/v_layers/v_heads/mlp_ratio/patch;
# image: side in pixels (Qwen2-VL: (side / patch / 2)^2 image tokens); vocab: model vocabulary (None: the tokenizer's)
PRESETS = {
    # ~5 M parameters, 64 image tokens, sequences of ~200 tokens: < 3 minutes on a 2-core CPU
    'cpu': dict(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, v_hidden=128, v_layers=4, v_heads=4,
                mlp_ratio=4, patch=4, image=64, vocab=None, tok_vocab=4096, K=4, words=55, prompt_words=12,
                trl_batch=None, queries_per_step=1, warmup=3, steps=20),
    # the CPU preset's model with a long image prefix: 256 px -> 1,024 image tokens, ~1,170-token sequences
    'cpu-long': dict(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, v_hidden=128, v_layers=4, v_heads=4,
                     mlp_ratio=4, patch=4, image=256, vocab=None, tok_vocab=4096, K=4, words=55, prompt_words=12,
                     trl_batch=None, queries_per_step=1, warmup=1, steps=3),
    # the README anchor: 711 M parameters (text 16 x 1024, vocabulary 151,936; vision 16 x 1024), 756x756 image ->
    # 729 image tokens, K=4 responses of 200 words (~1,190-token sequences)
    'gpu': dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=2, v_hidden=1024, v_layers=16, v_heads=16,
                mlp_ratio=4, patch=14, image=756, vocab=151936, tok_vocab=4096, K=4, words=200, prompt_words=12,
                trl_batch=None, queries_per_step=1, warmup=3, steps=10),
    # the same model at LLaVA-OneVision's any-resolution lengths: 2,380 px -> 7,225 image tokens, ~7,700-token sequences
    'gpu-anyres': dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=2, v_hidden=1024, v_layers=16,
                       v_heads=16, mlp_ratio=4, patch=14, image=2380, vocab=151936, tok_vocab=4096, K=4, words=200,
                       prompt_words=12, trl_batch=None, queries_per_step=1, warmup=2, steps=5),
}
METHODS = ('trl', 'grouped', 'shared', 'packed')
LAYOUT = dict(grouped='grouped', shared='shared', packed='packed')

# ------------------------------------------------------------------------------------------------ loss
try:
    from mmrlhf.dpo import mmdpo_loss as _mmdpo_loss
except ImportError:
    _mmdpo_loss = None


def inline_sigmoid_dpo(pc, pr, rc, rr, beta=0.1):
    "Standard sigmoid DPO per pair (stand-in while `mmrlhf.dpo` is not importable)."
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def pair_losses(pc, pr, rc, rr, delta, beta=0.1, use='auto'):
    "Per-pair losses: `mmrlhf.dpo.mmdpo_loss` when importable (or `use='mmdpo'`), else the inline sigmoid DPO."
    if use == 'mmdpo' or (use == 'auto' and _mmdpo_loss is not None):
        return _mmdpo_loss(pc, pr, rc, rr, delta=delta, beta=beta)[0]
    return inline_sigmoid_dpo(pc, pr, rc, rr, beta)


def loss_name(use):
    if use == 'mmdpo' or (use == 'auto' and _mmdpo_loss is not None): return 'mmrlhf.dpo.mmdpo_loss (delta given)'
    return 'inline_sigmoid_dpo (mmrlhf.dpo not importable)' if use == 'auto' else 'inline_sigmoid_dpo'

# ------------------------------------------------------------------------------------------------ model, data


def make_words(seed, n=4000):
    "Pseudo-words of 1-4 consonant-vowel(-consonant) syllables (about 2 tokens each with a 4,096-token BPE)."
    rng, C, V = random.Random(seed), 'bcdfghklmnprstvz', 'aeiou'
    syl = lambda: rng.choice(C) + rng.choice(V) + (rng.choice(C) if rng.random() < .4 else '')
    return sorted({''.join(syl() for _ in range(rng.randint(1, 4))) for _ in range(n)})


def build_processor(p, words, seed):
    rng = random.Random(seed)
    corpus = [' '.join(rng.choice(words) for _ in range(30)) + '.' for _ in range(3000)]
    tok = train_tokenizer(corpus, p['tok_vocab'], QWEN_TOKENS)
    px = dict(patch_size=p['patch'], merge_size=2, temporal_patch_size=2, min_pixels=(2 * p['patch']) ** 2,
              max_pixels=p['image'] ** 2)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**px), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**px, cap_pixels_per_frame=True),
                            chat_template=chatml_template(QWEN_IMG, QWEN_VID))


def build_config(p, tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    vocab = p['vocab'] or len(tok)
    assert vocab >= len(tok), f"model vocabulary {vocab} < tokenizer's {len(tok)}"
    half = p['hidden'] // p['heads'] // 2  # mrope sections (t, h, w) sum to head_dim / 2
    t = half // 4; h = (half - t) // 2
    text = dict(vocab_size=vocab, hidden_size=p['hidden'], intermediate_size=p['intermediate'],
                num_hidden_layers=p['layers'], num_attention_heads=p['heads'], num_key_value_heads=p['kv_heads'],
                max_position_embeddings=32768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                rope_parameters=dict(rope_type='default', rope_theta=1e6, mrope_section=[t, h, half - t - h]))
    vision = dict(depth=p['v_layers'], embed_dim=p['v_hidden'], num_heads=p['v_heads'], mlp_ratio=p['mlp_ratio'],
                  hidden_size=p['hidden'], patch_size=p['patch'], spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'],
                         vision_start_token_id=ids['<|vision_start|>'], vision_end_token_id=ids['<|vision_end|>'])


TRAIN_VISION = False  # set from --train-vision: every method trains (or freezes) the vision tower alike


def build_model(config, tok, device, seed):
    "Random-weight policy, identical for every method (same seed, same device), vision tower frozen unless asked."
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
    model.to(device)
    if not TRAIN_VISION: freeze_vision(model)
    gc_ = model.generation_config
    gc_.bos_token_id, gc_.eos_token_id, gc_.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model


def make_queries(p, words, n, seed):
    "n queries: (random-noise RGB image, prompt, K responses of ~`words` words)."
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.fromarray(nrng.integers(0, 256, (p['image'], p['image'], 3), dtype=np.uint8))
        prompt = ' '.join(rng.choice(words) for _ in range(p['prompt_words'])).capitalize() + '?'
        resps = [' '.join(rng.choice(words) for _ in range(max(1, round(p['words'] * rng.uniform(.9, 1.1))))).capitalize() + '.'
                 for _ in range(p['K'])]
        out.append((img, prompt, resps))
    return out


def query_pairs(K):
    "All K(K-1)/2 pairs (chosen, rejected) = (i, j), i < j: response i is ranked above j."
    return list(itertools.combinations(range(K), 2))


def trl_rows(queries, n_rows):
    "TRL's conversational vision-preference rows, every pair of every query in order, the first n_rows of them."
    rows = []
    for img, prompt, resps in queries:
        for i, j in query_pairs(len(resps)):
            rows.append(dict(images=[img], prompt=[{'role': 'user', 'content': prompt}],
                             chosen=[{'role': 'assistant', 'content': resps[i]}],
                             rejected=[{'role': 'assistant', 'content': resps[j]}]))
    assert len(rows) >= n_rows, (len(rows), n_rows)
    return rows[:n_rows]

# ------------------------------------------------------------------------------------------------ timing helpers


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    return None


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None


def rss_gib():
    "This process's resident memory now."
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30


def max_rss_gib():
    "This process's peak resident memory so far (Linux reports KiB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RSSPeak:
    "The highest RSS seen (sampled every 5 ms) while the block runs, over the RSS when it began."
    def __enter__(self):
        self.base = self.peak = rss_gib(); self._stop = threading.Event()
        def watch():
            while not self._stop.wait(0.005): self.peak = max(self.peak, rss_gib())
        self._t = threading.Thread(target=watch, daemon=True); self._t.start()
        return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, rss_gib())
        self.rise = self.peak - self.base


def autocast(device, bf16):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def to_device(batch, device):
    if isinstance(batch, dict): return {k: to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, 'items'): return {k: to_device(v, device) for k, v in batch.items()}  # BatchFeature
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch


def seq_shape(batch):
    if 'full' in batch: return dict(layout='full', input_ids=list(batch['full']['input_ids'].shape))
    if 'packed' in batch: return dict(layout='packed', input_ids=list(batch['packed']['input_ids'].shape))
    return dict(layout='shared', prefix_ids=list(batch['prefix']['input_ids'].shape),
                response_ids=list(batch['response_ids'].shape))

# ------------------------------------------------------------------------------------------------ runs


def run_trl(p, config, processor, queries, device, seed, warmup, steps, bf16, gradient_checkpointing=False):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self): self.times, self.t0 = [], None
        def on_step_begin(self, args, state, control, **kw): sync(device); self.t0 = time.perf_counter()
        def on_step_end(self, args, state, control, **kw): sync(device); self.times.append(time.perf_counter() - self.t0)

    base = reset_memory(device)
    tok = processor.tokenizer
    model = build_model(config, tok, device, seed)
    ref = copy.deepcopy(model).eval()  # TRL builds its own copy only from a hub id / path; give it the same weights
    n_rows = p['trl_batch'] * (warmup + steps)
    ds = Dataset.from_list(trl_rows(queries, n_rows))
    timer = StepTimer()
    out_dir = tempfile.mkdtemp(prefix='bench-dpo-trl-')
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=p['trl_batch'], gradient_accumulation_steps=1,
                     max_steps=warmup + steps, num_train_epochs=1, learning_rate=1e-6, lr_scheduler_type='constant',
                     beta=0.1, loss_type=['sigmoid'], max_length=None, bf16=bf16, use_cpu=device.type == 'cpu',
                     gradient_checkpointing=gradient_checkpointing, optim='adamw_torch_fused', max_grad_norm=1.0,
                     logging_steps=10**6, report_to='none', save_strategy='no', dataloader_num_workers=0,
                     disable_tqdm=True, seed=seed, remove_unused_columns=False)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=processor,
                         callbacks=[timer])
    def input_grad_hooks(model):
        "(module name, module, hook key) of every input-gradient hook transformers' checkpointing registered."
        return [(n, m, k) for n, m in model.named_modules() for k, h in m._forward_hooks.items()
                if getattr(h, '__name__', '') == 'make_inputs_require_grads']

    class SameCheckpointing(TrainerCallback):
        "Checkpointing as ours: without input-gradient hooks (TRL turns checkpointing back on around each reference pass)."
        def on_train_begin(self, args, state, control, model=None, **kw):
            enable_checkpointing(model)
            model.enable_input_require_grads = lambda: None  # re-enabling registers none
            # the Trainer registered a first set that `disable_input_require_grads` no longer knows of: left in
            # place, the one on the vision tower's patch embedding backpropagates through the frozen tower
            for _, m, k in input_grad_hooks(model): del m._forward_hooks[k]

        def on_step_end(self, args, state, control, model=None, **kw):
            left = [n for n, _, _ in input_grad_hooks(model)]
            if left: raise RuntimeError(f"input-gradient hooks came back on {left}: TRL's checkpointing is not ours")

    if gradient_checkpointing: trainer.add_callback(SameCheckpointing())
    # one collated batch, for its shape and the host-side collation time (not part of the timed step)
    rows = [ds[i] for i in range(p['trl_batch'])]
    t = time.perf_counter(); b = trainer.data_collator(rows); collate_s = time.perf_counter() - t
    shape = dict(layout='trl (prompt+chosen | prompt+rejected)', input_ids=list(b['input_ids'].shape),
                 completion_tokens=int(b['completion_mask'].sum()))
    with RSSPeak() as rss: trainer.train()
    peak = peak_gib(device)
    times = timer.times[warmup:]
    res = dict(pairs_per_step=p['trl_batch'], sequences_per_step=2 * p['trl_batch'], images_encoded_per_step=4 * p['trl_batch'],
               step_s=statistics.median(times), step_s_all=timer.times, encode_s_per_step=collate_s,
               ref_s=None, peak_gib=peak, allocated_before_gib=base, batch=shape,
               gradient_checkpointing=gradient_checkpointing, step_rss_gib=rss.rise,
               tokens_per_step=int(b['attention_mask'].sum()) * 2)
    del trainer, model, ref, ds, b
    reset_memory(device)
    return res


def run_ours(p, config, processor, queries, device, seed, warmup, steps, bf16, layout, loss_use,
             gradient_checkpointing=False):
    base = reset_memory(device)
    model = build_model(config, processor.tokenizer, device, seed)
    qps, K = p['queries_per_step'], p['K']
    n_steps = warmup + steps
    # host-side encoding (not part of the timed step, like TRL's collator)
    batches, enc = [], []
    for s in range(n_steps):
        t = time.perf_counter()
        batches.append(encode_groups(processor, queries[s * qps:(s + 1) * qps], layout=layout))
        enc.append(time.perf_counter() - t)
    # pair indices within the step's responses (responses ordered by query, K each)
    pairs = [(q * K + i, q * K + j) for q in range(qps) for i, j in query_pairs(K)]
    ci = torch.tensor([a for a, _ in pairs], device=device); ri = torch.tensor([b for _, b in pairs], device=device)
    delta = torch.tensor([float(b - a) for a, b in pairs], device=device)  # score margins for a dynamic beta
    # reference pass: once per response, before training (the step then reads stored values)
    model.eval(); ref_lp, ref_times = [], []
    with torch.no_grad():
        for b in batches:
            sync(device); t = time.perf_counter()
            with autocast(device, bf16):
                lp, _ = response_logps(model, to_device(b, device))
            sync(device); ref_times.append(time.perf_counter() - t)
            ref_lp.append(lp.float())
    model.train()
    if gradient_checkpointing: enable_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    params = [q for q in model.parameters() if q.requires_grad]
    reset_memory(device)  # peak of training (weights + grads + optimizer + activations); the ref pass peaked lower
    times, losses = [], []
    rss = RSSPeak().__enter__()
    for s, b in enumerate(batches):
        sync(device); t = time.perf_counter()
        bd = to_device(b, device)
        with autocast(device, bf16):
            lp, _ = response_logps(model, bd)
            r = ref_lp[s]
            loss = pair_losses(lp[ci], lp[ri], r[ci], r[ri], delta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(device); times.append(time.perf_counter() - t)
        losses.append(loss.item())
    rss.__exit__(None, None, None)
    peak = peak_gib(device)
    tokens = (int(batches[0]['packed']['doc'].ge(0).sum()) if layout == 'packed' else
              int(batches[0]['full']['attention_mask'].sum()) if layout == 'grouped' else
              int(batches[0]['prefix']['attention_mask'].sum() + batches[0]['response_mask'].sum()))
    res = dict(pairs_per_step=len(pairs), sequences_per_step=qps * K,
               images_encoded_per_step=qps if layout != 'grouped' else qps * K, step_rss_gib=rss.rise,
               gradient_checkpointing=gradient_checkpointing, tokens_per_step=tokens,
               step_s=statistics.median(times[warmup:]), step_s_all=times,
               encode_s_per_step=statistics.median(enc), ref_s=statistics.median(ref_times[warmup:] or ref_times),
               ref_s_all=ref_times, peak_gib=peak, allocated_before_gib=base, batch=seq_shape(batches[0]),
               first_losses=[round(x, 5) for x in losses[:3]])
    del model, opt, params, batches, ref_lp
    reset_memory(device)
    return res

# ------------------------------------------------------------------------------------------------ report


def machine(device):
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    name = platform.processor() or 'CPU'
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): name = line.split(':', 1)[1].strip(); break
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions():
    import transformers
    v = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)
    for m in ('trl', 'accelerate', 'datasets'):
        with contextlib.suppress(Exception): v[m] = __import__(m).__version__
    with contextlib.suppress(Exception):
        v['mmrlhf_git'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                         cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    if torch.cuda.is_available(): v['cuda'] = torch.version.cuda
    return v


LABEL = dict(trl="TRL DPOTrainer (reference online)", grouped="grouped: K full sequences, ref precomputed",
             shared="prefix-shared: 1 image+prompt, K continuations from its cache",
             packed="packed: [image+prompt | r1 | ... | rK], block mask")


def token_limit(P, R, K):
    "The token-count ratio: TRL's 8 (P + R) sequence-pass tokens per pair over the packed step's 3 (P + K R) / pairs."
    return 4 * K * (K - 1) * (P + R) / (3 * (P + K * R))


def table(report):
    f = lambda x, d=2: '—' if x is None else f"{x:.{d}f}"
    cpu = report['device'] == 'cpu'
    mem = 'step RSS rise GiB | peak RSS GiB' if cpu else 'peak GiB | —'
    lines = [f"| method | pairs/step | median step s | pairs/s | x TRL | ref pass s/step | x TRL incl. ref | {mem} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report['methods']:
        if r.get('skipped'):
            lines.append(f"| {LABEL[r['method']]} | skipped: {r['skipped']} |  |  |  |  |  |  |  |"); continue
        m1, m2 = (r['step_rss_gib'], r['peak_rss_gib']) if cpu else (r['peak_gib'], None)
        lines.append(f"| {LABEL[r['method']]} | {r['pairs_per_step']} | {f(r['step_s'], 3)} | {f(r['pairs_per_s'])} | "
                     f"{f(r.get('x_trl'))} | {f(r['ref_s'], 3)} | {f(r.get('x_trl_incl_ref'))} | {f(m1, 3)} | {f(m2, 2)} |")
    return '\n'.join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', choices=PRESETS, default='cpu')
    ap.add_argument('--methods', default='trl,grouped,shared,packed', help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument('--grad-checkpointing', action='store_true', help="activation checkpointing on for every method")
    ap.add_argument('--train-vision', action='store_true',
                    help="train the vision tower too, in every method (default: frozen in every method, as the paper "
                         "and `mmrlhf train-dpo` do)")
    ap.add_argument('--warmup', type=int); ap.add_argument('--steps', type=int)
    ap.add_argument('--K', type=int); ap.add_argument('--words', type=int); ap.add_argument('--image', type=int)
    ap.add_argument('--trl-batch', type=int, help="TRL pairs per step (default: our pairs per step)")
    ap.add_argument('--queries-per-step', type=int)
    ap.add_argument('--loss', choices=('auto', 'mmdpo', 'inline'), default='auto')
    ap.add_argument('--device', default=None, help="default: cuda if available, else cpu")
    ap.add_argument('--precision', choices=('auto', 'bf16', 'fp32'), default='auto',
                    help="bf16 autocast over fp32 weights, or fp32; auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--dry', action='store_true',
                    help="build the preset's model and processor, report its full-size sequence shapes, then time one "
                         "step per method on shrunk data (image 56 px, K=3, 8 words, 0 warmup)")
    ap.add_argument('--same-process', action='store_true', help="run every method in this process (no memory figures "
                                                                "per method)")
    ap.add_argument('--out', default=None, help="JSON file for all figures")
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)  # METHOD:FILE, run by the parent
    return ap.parse_args(argv)


def setup(a):
    "Device, precision, the preset (with overrides), processor, config, queries and their token counts."
    global TRAIN_VISION
    TRAIN_VISION = a.train_vision
    warnings.filterwarnings('ignore', message='.*truncat.*')
    warnings.filterwarnings('ignore', message='.*gradient_checkpointing.*deprecated.*', category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cpu': os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    bf16 = a.precision == 'bf16' or (a.precision == 'auto' and device.type == 'cuda')
    p = dict(PRESETS[a.preset])
    for k in ('warmup', 'steps', 'K', 'words', 'image', 'trl_batch', 'queries_per_step'):
        if getattr(a, k) is not None: p[k] = getattr(a, k)
    words = make_words(a.seed)
    processor = build_processor(p, words, a.seed)
    config = build_config(p, processor.tokenizer)
    with torch.device('meta'):
        n_params = sum(x.numel() for x in Qwen2VLForConditionalGeneration(config).parameters())
    full_shape = None
    if a.dry:  # the real preset's sequence shapes, from the processor alone
        q = make_queries(p, words, 1, a.seed)
        fb = encode_groups(processor, q, layout='grouped')
        n_img = int((fb['full']['input_ids'][0] == config.image_token_id).sum())
        full_shape = dict(image_tokens=n_img, full=seq_shape(fb), packed=seq_shape(encode_groups(processor, q)),
                          response_tokens=fb['full']['labels'].ne(-100).sum(1).tolist())
        p.update(image=56 if p['patch'] == 14 else 2 * 2 * p['patch'], K=3, words=8, warmup=0, steps=1)
    if p['trl_batch'] is None: p['trl_batch'] = p['queries_per_step'] * p['K'] * (p['K'] - 1) // 2
    n_queries = p['queries_per_step'] * (p['warmup'] + p['steps'])
    n_pairs_needed = p['trl_batch'] * (p['warmup'] + p['steps'])
    n_queries = max(n_queries, -(-n_pairs_needed // (p['K'] * (p['K'] - 1) // 2)))
    queries = make_queries(p, words, n_queries, a.seed)
    fb = encode_groups(processor, queries[:1], layout='grouped')['full']
    seq_len = fb['attention_mask'].sum(1).tolist()
    resp = fb['labels'].ne(-100).sum(1).tolist()
    P, R = statistics.mean(n - r for n, r in zip(seq_len, resp)), statistics.mean(resp)
    shape = dict(n_params=n_params, image_tokens=int((fb['input_ids'][0] == config.image_token_id).sum()),
                 sequence_lengths_first_query=seq_len, prompt_tokens=P, response_tokens=R, full_size_shapes=full_shape)
    return device, bf16, p, processor, config, queries, shape


# dense bf16 peak FLOP/s, for model FLOPs utilisation
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12}


def model_flops_utilisation(r, n_params, device, method):
    "6 N per trained token (forward + backward), 2 N per reference token, over step time and the device's peak."
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(device)), None)
    if peak is None: return None
    flops = 6 * n_params * r['tokens_per_step'] + (2 * n_params * r['tokens_per_step'] if method == 'trl' else 0)
    return flops / r['step_s'] / peak


def run_method(m, a, device, bf16, p, processor, config, queries, n_params):
    "One method's record."
    gc_ = a.grad_checkpointing
    if m == 'shared' and gc_:
        return dict(method=m, skipped="needs the prefix's KV cache, which gradient checkpointing cannot keep",
                    grad_checkpointing=True)
    t = time.perf_counter()
    if m == 'trl': r = run_trl(p, config, processor, queries, device, a.seed, p['warmup'], p['steps'], bf16, gc_)
    else: r = run_ours(p, config, processor, queries, device, a.seed, p['warmup'], p['steps'], bf16, LAYOUT[m], a.loss, gc_)
    r['pairs_per_s'] = r['pairs_per_step'] / r['step_s']
    r['pairs_per_s_incl_ref'] = r['pairs_per_s'] if r['ref_s'] is None else r['pairs_per_step'] / (r['step_s'] + r['ref_s'])
    r['run_wall_s'] = time.perf_counter() - t
    r['peak_rss_gib'] = max_rss_gib() if device.type == 'cpu' else None
    if device.type == 'cpu': r['peak_gib'] = r['peak_rss_gib']  # the JSON's peak: CUDA peak on a GPU, peak RSS on CPU
    if device.type == 'cuda': r['mfu'] = model_flops_utilisation(r, n_params, device, m)
    return dict(method=m, grad_checkpointing=gc_, **r)


def main():
    a = parse_args()
    device, bf16, p, processor, config, queries, shape = setup(a)
    if a.child:  # one method, its record to a file
        m, out = a.child.split(':', 1)
        Path(out).write_text(json.dumps(run_method(m, a, device, bf16, p, processor, config, queries,
                                                     shape['n_params']), default=str))
        return
    methods = [m.strip() for m in a.methods.split(',') if m.strip()]
    assert all(m in METHODS for m in methods), methods
    t_start = time.perf_counter()
    print(f"{a.preset}: {shape['n_params'] / 1e6:.1f} M params, {p['image']}px image -> {shape['image_tokens']} image "
          f"tokens, K={p['K']}, sequence lengths {shape['sequence_lengths_first_query']}, device {device}, bf16 "
          f"autocast {bf16}, gradient checkpointing {a.grad_checkpointing}, loss {loss_name(a.loss)}", flush=True)
    records = []
    for m in methods:
        if a.same_process:
            r = run_method(m, a, device, bf16, p, processor, config, queries, shape['n_params'])
        else:
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / 'record.json'
                argv = [sys.executable, __file__, *sys.argv[1:], '--child', f"{m}:{f}"]
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode: sys.exit(f"{m} failed:\n{done.stderr[-4000:]}")
                r = json.loads(f.read_text())
        records.append(r)
        if not r.get('skipped'):
            print(f"  {m}: median step {r['step_s']:.3f} s, {r['pairs_per_s']:.2f} pairs/s "
                  f"({r['run_wall_s']:.0f} s wall)", flush=True)
    trl = next((r for r in records if r['method'] == 'trl'), None)
    for r in records:
        if trl is None or r.get('skipped'): continue
        r['x_trl'] = r['pairs_per_s'] / trl['pairs_per_s']
        r['x_trl_incl_ref'] = r['pairs_per_s_incl_ref'] / trl['pairs_per_s']
        mem = 'peak_gib' if device.type == 'cuda' else 'step_rss_gib'
        if r.get(mem) is not None and trl.get(mem): r['memory_x_trl'] = r[mem] / trl[mem]
    limit = token_limit(shape['prompt_tokens'], shape['response_tokens'], p['K'])
    report = dict(machine=machine(device), device=str(device),
                  date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), versions=versions(),
                  preset_name=a.preset, dry=a.dry, preset=p, bf16_autocast=bf16, grad_checkpointing=a.grad_checkpointing,
                  train_vision=a.train_vision,
                  loss=loss_name(a.loss), attn_implementation=config._attn_implementation,
                  tokenizer_vocab=len(processor.tokenizer), model_vocab=config.text_config.vocab_size, **shape,
                  token_count_ratio_limit=limit, methods=records, wall_s=time.perf_counter() - t_start)
    print()
    print(f"DPO step throughput — {report['machine']} — {report['date']}")
    print(' '.join(f"{k} {v}" for k, v in report['versions'].items()))
    print(f"preset {a.preset}{' (dry)' if a.dry else ''}: {shape['n_params'] / 1e6:.1f} M params, "
          f"{shape['image_tokens']} image tokens, K={p['K']}, ~{p['words']} words/response, prompt P = "
          f"{shape['prompt_tokens']:.0f} and response R = {shape['response_tokens']:.0f} tokens, {p['warmup']} warmup + "
          f"{p['steps']} timed steps, {'bf16 autocast' if bf16 else 'fp32'}, AdamW (fused), gradient checkpointing "
          f"{'on' if a.grad_checkpointing else 'off'} and the vision tower {'trained' if a.train_vision else 'frozen'} "
          f"in every method; our loss: {report['loss']}")
    print(table(report))
    print(f"token-count limit of packed over TRL: 4K(K-1)(P+R) / (3(P+KR)) = {limit:.2f}x (language-model tokens only)")
    print(f"total wall {report['wall_s']:.0f} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
