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
