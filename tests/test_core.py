"Core contracts that need a real process: a crash mid-write leaves the old file."
import subprocess, sys

from mmrlhf.core import read_jsonl, write_jsonl


def test_killed_writer_leaves_old_file(tmp_path):
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"id": "old"}])
    code = f"""
import os
from mmrlhf.core import atomic_write
with atomic_write({str(target)!r}) as f:
    f.write('{{"id": "new"')
    f.flush()
    os._exit(9)   # the process dies mid-write, without any cleanup
"""
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == 9
    assert [rec for _, rec in read_jsonl(target)] == [{"id": "old"}]


def test_read_jsonl_names_bad_bytes_and_nan(tmp_path):
    import pytest
    from mmrlhf.core import DataError
    bad = tmp_path / "pool.jsonl"
    bad.write_bytes(b'{"id": "a"}\n{"id": "b", "question": "caf\xe9"}\n')
    with pytest.raises(DataError) as e: list(read_jsonl(bad))
    assert (e.value.file, e.value.line) == (str(bad), 2) and "not UTF-8" in e.value.reason
    nan = tmp_path / "scored.jsonl"
    nan.write_text('{"id": "a", "responses": [{"ref_logp": -3.5}, {"ref_logp": -Infinity}]}\n')
    with pytest.raises(DataError) as e: list(read_jsonl(nan))
    assert e.value.field == "responses.1.ref_logp"
    with pytest.raises(ValueError, match="reward is NaN"): write_jsonl(tmp_path / "out.jsonl", [{"id": "a", "reward": float("nan")}])
    assert not (tmp_path / "out.jsonl").exists()


def test_killed_folder_writer_leaves_nothing_visible(tmp_path):
    from mmrlhf.core import atomic_dir, clean_stale_temps
    target = tmp_path / "final"
    code = f"""
import os
from mmrlhf.core import atomic_dir
with atomic_dir({str(target)!r}) as d:
    (d / "config.json").write_text("{{}}")
    os._exit(9)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not target.exists() and (tmp_path / ".final.partial").is_dir()
    assert clean_stale_temps(tmp_path) == 1 and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as d: (d / "model.safetensors").write_bytes(b"w")
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]


TOY_TRAINER = r'''
import json, os, sys, warnings
import torch
from transformers import Trainer, TrainingArguments
from mmrlhf.core import GlobalMeanTrainer, last_complete_checkpoint

class Items(GlobalMeanTrainer, Trainer):
    def count_items(self, batch): return {"pairs": int(batch["mask"].sum())}
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per_item = model(inputs["x"]).squeeze(-1) * inputs["mask"]
        return self.global_mean(per_item.sum(), "pairs", num_items_in_batch, int(inputs["mask"].sum()))

def collate(rows):
    x, m = torch.zeros(len(rows), 12, 3), torch.zeros(len(rows), 12)
    for i, r in enumerate(rows): x[i, :len(r)], m[i, :len(r)] = torch.tensor(r), 1
    return {"x": x, "mask": m}

out, batch, accum, steps, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "resume"
data = json.loads(open(os.path.join(os.path.dirname(out), "queries.json")).read())
torch.manual_seed(0); model = torch.nn.Linear(3, 1, bias=False)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=steps,
                         learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", save_strategy="steps", save_steps=1,
                         report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0)
trainer = Items(model=model, args=args, train_dataset=data, data_collator=collate)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ckpt = last_complete_checkpoint(out) if resume else None
print("resumed from", ckpt, "|", " ".join(str(w.message) for w in caught), flush=True)
trainer.train(resume_from_checkpoint=ckpt)
if trainer.args.should_save: json.dump(model.weight.detach().tolist(), open(out + ".weights.json", "w"))
trainer.accelerator.end_training()
os._exit(0)   # gloo can abort at interpreter exit after a finished run: the saved file is the result
'''


def _toy(tmp_path, name, batch, accum, steps=1, processes=1, resume=False):
    import json, os
    from pathlib import Path
    script = tmp_path / "toy.py"; script.write_text(TOY_TRAINER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launch = [sys.executable] if processes == 1 else [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29541"]
    r = subprocess.run(launch + [str(script), str(tmp_path / name), str(batch), str(accum), str(steps), "resume" if resume else "fresh"],
                       capture_output=True, text=True, env=env, timeout=300)
    w = tmp_path / f"{name}.weights.json"
    assert w.exists(), (r.stdout + r.stderr)[-3000:]
    return json.loads(w.read_text()), r.stdout


def _queries(tmp_path):
    "Four queries with 3, 10, 1 and 6 items: unequal counts, so a per-micro-batch mean would weigh them differently."
    import json, random
    rng = random.Random(0)
    qs = [[[rng.gauss(0, 1) for _ in range(3)] for _ in range(n)] for n in (3, 10, 1, 6)]
    (tmp_path / "queries.json").write_text(json.dumps(qs))
    return qs


def test_global_mean_is_the_same_however_the_batch_is_split(tmp_path):
    import torch
    qs = _queries(tmp_path)
    torch.manual_seed(0); w0 = torch.nn.Linear(3, 1, bias=False).weight.detach()
    expected = w0 - 0.5 * torch.tensor([x for q in qs for x in q]).mean(0)   # one SGD step on the mean of w·x over all 20 items
    one, _ = _toy(tmp_path, "one", batch=4, accum=1)
    acc, _ = _toy(tmp_path, "acc", batch=1, accum=4)
    two, _ = _toy(tmp_path, "two", batch=1, accum=2, processes=2)
    for w in (one, acc, two): assert torch.allclose(torch.tensor(w), expected, atol=1e-6), (w, expected)


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    import json
    _queries(tmp_path)
    straight, _ = _toy(tmp_path, "straight", batch=1, accum=1, steps=4)
    _toy(tmp_path, "run", batch=1, accum=1, steps=2)
    half = tmp_path / "run" / "checkpoint-3"          # what a run killed while writing step 3's checkpoint leaves
    half.mkdir(); (half / "config.json").write_text("{}")
    (tmp_path / "run.weights.json").unlink()
    resumed, out = _toy(tmp_path, "run", batch=1, accum=1, steps=4, resume=True)
    assert "resumed from " + str(tmp_path / "run" / "checkpoint-2") in out and "checkpoint-3: incomplete checkpoint" in out
    assert resumed == straight
    assert json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_checkpoint_appears_only_when_complete(tmp_path):
    "A run killed while the Trainer writes a checkpoint leaves no `checkpoint-N` folder for resume to pick."
    _queries(tmp_path)
    code = TOY_TRAINER.replace("trainer.train(", "trainer._save_rng_state = lambda d: os._exit(9)\ntrainer.train(")
    script = tmp_path / "killed.py"; script.write_text(code)
    import os
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "1", "1", "2", "fresh"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    assert not list((tmp_path / "killed").glob("checkpoint-*")) and list((tmp_path / "killed" / ".staging").glob("checkpoint-1"))
