"""`--bundle-code`: user layers travel with the archive and run only with `--trust-code`.

Replays run in interpreters whose PYTHONPATH lacks `tests/`, so the layer's
module can only come from the archive: a replay that reproduces proves the
bundled copy was imported, and a refusal proves nothing was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cases
import pytest
from conftest import TESTS, run_reprokit, subprocess_env

import reprokit
from reprokit._errors import ArchiveError, CaptureError, RefusedTypeError
from reprokit.record import _bundle

SCRIPT = '''"""A reporter's script: the misbehaving layer is defined right here, in __main__."""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models import simple_mlp

LIMIT = 3.0
x = "a global that a method parameter shadows; never bundled"


def squash(x):
    return LIMIT * jnp.tanh(x / LIMIT)


@pz.pytree_dataclass
class Squash(pz.nn.Layer):
    """Scales, then squashes."""

    scale: pz.nn.ParameterLike
    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        return pz.nx.nmap(squash)(x * self.scale.value)


def make_call():
    base = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 4]
    )
    layer = Squash(scale=pz.Parameter(value=jnp.asarray(2.5), label="sq.scale"), axis="features")
    model = pz.nn.Sequential([base, layer, pz.nn.Elementwise(squash)])
    return model, pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")


if __name__ == "__main__":
    import reprokit

    model, argument = make_call()
    selection = pz.select(model).at_instances_of(Squash).pick_nth_selected(0)
    try:
        reprokit.pack(selection, argument, out=sys.argv[1] + ".plain.zip", check=False)
    except reprokit.CaptureError as error:
        print("WITHOUT BUNDLE:", error)
    result = reprokit.pack(selection, argument, out=sys.argv[1], bundle_code=True)
    print("SELF-CHECK:", result.self_check["reproduced"])
'''


def _env_without_tests() -> dict[str, str]:
    """A replay environment in which `custom_layers` (in tests/) cannot be imported."""
    env = subprocess_env()
    env["PYTHONPATH"] = ""
    return env


@pytest.fixture(scope="module")
def custom_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "custom.repro.zip"
    selection, argument, side_inputs = cases.custom_case()
    reprokit.pack(
        selection, argument, side_inputs=side_inputs, out=path, bundle_code=True, check=False
    )
    return path


def test_bundle_holds_exactly_the_user_module_with_its_sha256(custom_archive):
    source = (TESTS / "custom_layers.py").read_bytes()
    with zipfile.ZipFile(custom_archive) as archive:
        code = [n for n in archive.namelist() if n.startswith("code/")]
        manifest = json.loads(archive.read("manifest.json"))
        assert archive.read("code/custom_layers.py") == source
    assert code == ["code/custom_layers.py"]  # not penzai, jax, numpy, nor the tests' other modules
    (entry,) = manifest["code"]["files"]
    assert entry["module"] == "custom_layers"
    assert entry["sha256"] == hashlib.sha256(source).hexdigest()
    assert manifest["modules"] == ["custom_layers"]


def test_run_refuses_bundled_code_without_trust_code(custom_archive):
    listed = run_reprokit("inspect", custom_archive, env=_env_without_tests())
    assert listed.returncode == 0, listed.stderr
    assert "code/custom_layers.py  module custom_layers" in listed.stdout
    assert "only with --trust-code" in listed.stdout
    refused = run_reprokit("run", custom_archive, env=_env_without_tests())
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "code/custom_layers.py (custom_layers)" in refused.stderr
    assert "--trust-code" in refused.stderr and refused.stderr.count("\n") == 1
    # Checking by the rules alone imports nothing, so verify accepts it.
    assert run_reprokit("verify", custom_archive, env=_env_without_tests()).returncode == 0


def test_run_with_trust_code_reproduces_from_the_bundled_copy(custom_archive):
    result = run_reprokit("run", custom_archive, "--trust-code", "--json", env=_env_without_tests())
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["reproduced"] and verdict["output_bitwise_equal"]


def test_html_view_imports_bundled_code_only_with_trust_code(custom_archive, tmp_path):
    page = tmp_path / "custom.html"
    refused = run_reprokit("inspect", custom_archive, "--html", page, env=_env_without_tests())
    assert refused.returncode == 3 and not page.exists(), refused.stdout + refused.stderr
    assert "--trust-code" in refused.stderr and refused.stderr.count("\n") == 1
    shown = run_reprokit(
        "inspect", custom_archive, "--html", page, "--trust-code", env=_env_without_tests()
    )
    assert shown.returncode == 0, shown.stderr
    assert page.stat().st_size > 0 and "works offline" in shown.stdout


def test_tampered_bundled_code_is_refused_even_when_trusted(custom_archive, tmp_path):
    tampered = tmp_path / "tampered.repro.zip"
    with zipfile.ZipFile(custom_archive) as source, zipfile.ZipFile(tampered, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "code/custom_layers.py":
                data = data.replace(b"def soft_clip(x):", b"def soft_clip(x):\n    print('PWNED')")
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
    result = run_reprokit("run", tampered, "--trust-code", env=_env_without_tests())
    assert result.returncode == 3 and "does not match its sha256" in result.stderr
    assert "PWNED" not in result.stdout


def test_manifest_cannot_bundle_libraries_or_stray_files():
    good = {"path": "code/mine.py", "module": "mine", "sha256": "0" * 64, "bytes": 1, "source": "x"}
    assert _bundle.bundled_modules({"code": {"files": [good]}}) == ("mine",)
    for change in (
        {"path": "code/penzai/__init__.py", "module": "penzai"},
        {"path": "code/os.py", "module": "os"},
        {"path": "code/../x.py", "module": "x"},
        {"path": "code/mine.py", "module": "other"},
        {"sha256": "nothex"},
    ):
        with pytest.raises(ArchiveError):
            _bundle.bundled_modules({"code": {"files": [{**good, **change}]}})

    class Reader:
        names = ["code/mine.py", "code/extra.py"]

    with pytest.raises(ArchiveError, match="not both listed and present"):
        _bundle.check_members(Reader(), {"code": {"files": [good]}})


def test_trusted_bundle_may_not_replace_an_installed_library():
    assert _bundle._installed_location("scipy") is not None  # jax depends on it
    assert _bundle._installed_location("custom_layers") is None  # tests/ is the user's own
    entry = {
        "path": "code/scipy.py",
        "module": "scipy",
        "sha256": "0" * 64,
        "bytes": 1,
        "source": "",
    }

    class Opened:
        path = "fake.repro.zip"
        manifest = {"code": {"files": [entry]}, "modules": ["scipy"]}

    with pytest.raises(RefusedTypeError, match="may not replace installed libraries"):
        _bundle.admit(Opened(), (), trust_code=True)


def test_extraction_takes_what_the_layer_uses_and_no_shadowed_globals(tmp_path):
    script = tmp_path / "reporter_script.py"
    script.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("__reprokit_target__", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["__reprokit_target__"] = module
    try:
        spec.loader.exec_module(module)
        source = _bundle._extract_main(module, {"Squash"})
    finally:
        del sys.modules["__reprokit_target__"]
    assert "class Squash" in source and "def squash" in source and "LIMIT = 3.0" in source
    assert "from __future__ import annotations" in source
    assert "import penzai.pz as pz" in source and "import jax.numpy as jnp" in source
    assert "shadows" not in source and "simple_mlp" not in source and "make_call" not in source


def test_main_layer_in_a_script_packs_with_bundle_code_and_replays(tmp_path):
    script = tmp_path / "reporter_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "main.repro.zip"
    packed = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        env=_env_without_tests(),
        timeout=300,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "WITHOUT BUNDLE:" in packed.stdout and "--bundle-code" in packed.stdout
    assert "SELF-CHECK: True" in packed.stdout
    with zipfile.ZipFile(out) as archive:
        assert [n for n in archive.namelist() if n.startswith("code/")] == [
            "code/repro_main_reporter_script.py"
        ]
    script.unlink()  # the maintainer has only the archive
    refused = run_reprokit("run", out, env=_env_without_tests())
    assert refused.returncode == 3 and "code/repro_main_reporter_script.py" in refused.stderr
    replayed = run_reprokit("run", out, "--trust-code", env=_env_without_tests())
    assert replayed.returncode == 0, replayed.stderr
    assert "REPRODUCED" in replayed.stdout


def test_cli_target_script_packs_with_bundle_code(tmp_path):
    script = tmp_path / "reporter_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "elementwise.repro.zip"
    packed = run_reprokit(
        "pack",
        f"{script}:make_call",
        "--select",
        "Sequential.sublayers[2]",
        "--bundle-code",
        "--no-check",
        "-o",
        out,
        env=_env_without_tests(),
    )
    assert packed.returncode == 0, packed.stderr
    with zipfile.ZipFile(out) as archive:
        source = archive.read("code/repro_main_reporter_script.py").decode()
    assert "def squash" in source and "class Squash" not in source  # only what the layer uses
    replayed = run_reprokit("run", out, "--trust-code", env=_env_without_tests())
    assert replayed.returncode == 0, replayed.stderr


def test_loading_in_process_checks_an_already_imported_module(custom_archive, tmp_path):
    # custom_layers is imported here from tests/, identical to the bundled copy: accepted.
    loaded = reprokit.load(custom_archive, trust_code=True)
    assert type(loaded.submodel).__module__ == "custom_layers"
    # The archive's finder does not outlive the load.
    assert not any(isinstance(f, _bundle._BundleFinder) for f in sys.meta_path)
    with pytest.raises(RefusedTypeError, match="--trust-code"):
        reprokit.load(custom_archive)


def test_unbundlable_global_is_refused_with_a_message(tmp_path):
    script = tmp_path / "bad_script.py"
    script.write_text(
        "import threading\nLOCK = threading.Lock()\n\ndef f(x):\n    with LOCK:\n        return x\n"
    )
    spec = importlib.util.spec_from_file_location("__reprokit_target__", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["__reprokit_target__"] = module
    try:
        spec.loader.exec_module(module)
        with pytest.raises(CaptureError, match="uses the global 'LOCK'"):
            _bundle._extract_main(module, {"f"})
    finally:
        del sys.modules["__reprokit_target__"]


def test_trust_code_reaches_the_sweep_and_reference_workers(custom_archive):
    result = run_reprokit(
        "run",
        custom_archive,
        "--trust-code",
        "--sweep",
        "--reference",
        "float64",
        "--json",
        env=_env_without_tests(),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["condition"]: row for row in report["sweep"]}
    assert rows["x64 on (float64 params)"]["ran"], rows["x64 on (float64 params)"]["note"]
    assert rows["StableHLO artifact (jit, no penzai)"]["ran"]
    assert report["reference"]["leaves"]
