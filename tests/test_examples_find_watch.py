"""The find and watch examples run as scripts, pack the right layer, and replay."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_json, subprocess_env


def _run_example(name, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_find_nan_example_finds_the_corrupted_projection(tmp_path):
    done = _run_example("find_nan.py", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<== CULPRIT" in done.stdout
    code, verdict = run_json("run", tmp_path / "found-nan.repro.zip", cwd=tmp_path)
    assert code == 0 and verdict["reproduced"]
    assert verdict["layer"]["keypath"].endswith("Attention.input_to_value/Sequential.sublayers[0]")
    manifest = json.loads(
        __import__("zipfile").ZipFile(tmp_path / "found-nan.repro.zip").read("manifest.json")
    )
    assert "found_by" in manifest


def test_watch_decoding_example_packs_the_failing_step(tmp_path):
    done = _run_example("watch_decoding.py", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step  6: token  7, logits NON-FINITE" in done.stdout
    code, verdict = run_json("run", tmp_path / "decode-step.repro.zip", cwd=tmp_path)
    assert code == 0 and verdict["reproduced"]
    assert verdict["layer"]["type"] == "penzai.nn.embeddings.EmbeddingLookup"
