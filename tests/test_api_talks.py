"""The Python API talks like the CLI: pack and watch print their summary to a person.

In a terminal (or a notebook) `reprokit.pack` prints the same short summary
as `reprokit pack`, and `reprokit.watch` says where it wrote each archive;
`quiet=True` silences them, and output piped to a file or a test stays clean.
The terminal is a real pseudo-terminal, the code runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

from conftest import TESTS, subprocess_env

CODE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax.numpy as jnp
    from penzai import pz
    import models, reprokit

    model = models.mlp()
    poisoned = pz.select(model).at_instances_of(pz.Parameter).pick_nth_selected(1).apply(
        lambda p: pz.Parameter(value=p.value * jnp.nan, label=p.label))
    sel = pz.select(poisoned).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
    result = reprokit.pack(sel, models.mlp_input(), out="api.repro.zip", check=False,
                           quiet={quiet})
    assert "recorded issue" in result.summary()
    watched = reprokit.watch(poisoned, out="watched.repro.zip", self_check=False, quiet={quiet})
    watched(models.mlp_input())
    assert len(watched.archives) == 1
    print("DONE")
    """
)


def _run(tmp_path, *, quiet: bool, terminal: bool) -> str:
    code = CODE.format(tests=str(TESTS), quiet=quiet)
    if not terminal:
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=subprocess_env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=follower,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=300)
    os.close(leader)
    assert process.returncode == 0, process.stderr.read().decode()
    return b"".join(chunks).decode()


def test_pack_and_watch_print_their_summary_in_a_terminal(tmp_path):
    text = _run(tmp_path, quiet=False, terminal=True)
    assert "packed penzai.nn.linear_and_affine.Linear" in text
    assert "into api.repro.zip" in text and "replay: reprokit run api.repro.zip" in text
    assert "reprokit.watch: wrote watched.repro.zip at model call" in text
    assert "replay: reprokit run watched.repro.zip" in text
    assert "DONE" in text


def test_quiet_and_pipes_print_nothing(tmp_path):
    assert _run(tmp_path, quiet=True, terminal=True).strip() == "DONE"
    assert _run(tmp_path, quiet=False, terminal=False).strip() == "DONE"
