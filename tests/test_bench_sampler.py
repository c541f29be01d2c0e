"""bench/sampler.py runs (CPU interpreter, tiny sizes) and writes its JSON: the GPU run is one command away."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sampler_benchmark_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sampler.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "sampler_smoke.json").read_text())
    sections = {r["section"] for r in data["records"]}
    assert sections == {"check", "sampler", "tune", "verify"}, sections
    assert all(r["tokens_equal"] == 1.0 for r in data["records"] if r["section"] == "check")
    impls = {(r["config"], r["impl"]) for r in data["records"] if r["section"] == "sampler"}
    assert ("top_k_50_top_p_0.95", "new") in impls and ("top_p_0.95", "old") in impls and ("greedy", "argmax") in impls
