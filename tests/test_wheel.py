"""The built wheel, installed for real (not editable), carries and renders its templates."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from conftest import REPO, run_python, subprocess_env


def test_wheel_ships_templates_and_renders_them(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("reprokit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reprokit/templates/replay.py.j2" in names
    assert "reprokit/templates/README.md.j2" in names
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    code = """
import json, reprokit, reprokit.views._script as script
manifest = {"layer": {"type": "penzai.nn.linear_and_affine.Linear", "keypath": ".x"},
            "signature": {"kind": "output"}, "note": "", "call": {"index": 0, "count": 1},
            "mode": "eager", "arrays": {"count": 0, "bytes": 0}, "reprokit_version": "0",
            "created": "now", "modules": [], "exception_traceback": [],
            "environment": {"packages": {"jax": "0.10.2"}}}
print(json.dumps({"file": reprokit.__file__, "templates": str(script.templates_dir()),
                  "readme": script.render_readme(manifest)}))
"""
    env = subprocess_env(PYTHONPATH=str(site))
    result = run_python(code, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(site))
    assert report["templates"].startswith(str(site))
    assert "reprokit archive: Linear at `.x`" in report["readme"]
