"""Nothing private leaks into an archive: secrets, home paths, user and host names."""

from __future__ import annotations

import socket
import textwrap
import zipfile
import zlib

from conftest import TESTS, run_python, subprocess_env

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRET",
    "HF_TOKEN": "hf_reprokitLeakCanaryTokenValue1234",
    "GITHUB_TOKEN": "ghp_reprokitLeakCanary0123456789abcdef",
    "WANDB_API_KEY": "wandb-reprokit-canary-5a5a5a5a5a",
}
USER = "quentinleaktest"

LEAKY_MODULE = textwrap.dedent(
    """
    import dataclasses
    from penzai import pz

    @pz.pytree_dataclass
    class Leaky(pz.nn.Layer):
        limit: int = dataclasses.field(metadata={"pytree_node": False})

        def __call__(self, x, /, **side_inputs):
            raise ValueError(f"cannot open {__file__} for user quentinleaktest")
    """
)

PACK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from penzai import pz
    import models, reprokit, leaky_layers
    model = pz.nn.Sequential([models.mlp(), leaky_layers.Leaky(limit=1)])
    sel = pz.select(model).at_instances_of(leaky_layers.Leaky)
    reprokit.pack(sel, models.mlp_input(), out={out!r}, allow_modules=["leaky_layers"],
                  note="my token is " + {token!r} + " and I live in " + {home!r})
    """
)


def _members_decompressed(path):
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            yield info.filename, archive.read(info)
    # Also the raw file, in case anything sits outside a member.
    raw = open(path, "rb").read()
    yield "<raw>", raw
    yield "<raw-inflated>", b"".join(_inflate_all(raw))


def _inflate_all(raw):
    with zipfile.ZipFile(__import__("io").BytesIO(raw)) as archive:
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_DEFLATED:
                offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                yield zlib.decompressobj(-15).decompress(raw[offset : offset + info.compress_size])


def test_packing_with_secrets_set_leaks_none_of_them(tmp_path):
    home = tmp_path / "home" / USER
    project = home / "projects" / "secret-model"
    project.mkdir(parents=True)
    (project / "leaky_layers.py").write_text(LEAKY_MODULE)
    out = tmp_path / "leak.repro.zip"
    env = subprocess_env(
        **SECRETS,
        HOME=str(home),
        USER=USER,
        LOGNAME=USER,
        PYTHONPATH=f"{project}:{TESTS}",
        JAX_COMPILATION_CACHE_DIR=str(home / ".cache" / "jax"),
        XLA_FLAGS=f"--xla_cpu_enable_fast_math=false --xla_dump_to={home}/dumps",
    )
    code = PACK.format(tests=str(TESTS), out=str(out), token=SECRETS["HF_TOKEN"], home=str(home))
    result = run_python(code, cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    forbidden = [*SECRETS.values(), str(home), USER]
    hostname = socket.gethostname()
    if len(hostname) >= 6:  # short host names ("vm") occur in ordinary words
        forbidden.append(hostname)
    seen = set()
    for name, data in _members_decompressed(out):
        seen.add(name)
        for secret in forbidden:
            assert secret.encode() not in data, f"{secret!r} leaked into {name}"
    assert {"manifest.json", "structure.msgpack", "replay.py", "README.md"} <= seen
    # The useful parts are still there.
    manifest = zipfile.ZipFile(out).read("manifest.json").decode()
    assert "--xla_cpu_enable_fast_math=false" in manifest
    assert "leaky_layers.py" in manifest  # traceback kept, made relative


WORKING_MODULE = textwrap.dedent(
    """
    import jax.numpy as jnp
    from penzai import pz

    @pz.pytree_dataclass
    class Doubler(pz.nn.Layer):
        def __call__(self, x, /, **side_inputs):
            return pz.nx.nmap(jnp.tanh)(x) * 2.0
    """
)

PACK_WORKING = textwrap.dedent(
    """
    import sys, zipfile
    sys.path.insert(0, {tests!r})
    from penzai import pz
    import models, reprokit, working_layers
    model = pz.nn.Sequential([models.mlp(), working_layers.Doubler()])
    sel = pz.select(model).at_instances_of(working_layers.Doubler)
    reprokit.pack(sel, models.mlp_input(), out={out!r}, check=False)
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    blob = zipfile.ZipFile({out!r}).read("stablehlo.mlirbc")
    with mlir.make_ir_context():
        module = _jax.mlir.deserialize_portable_artifact(blob)
        print(module.operation.get_asm(enable_debug_info=True))
    """
)


def test_stablehlo_module_keeps_lines_but_no_paths(tmp_path):
    """The exported module names no file: no home, user or project (SECURITY.md, class 5).

    jax writes each operation's file, line and function into the module; pack
    exports with every file name emptied, keeping lines and function names.
    """
    home = tmp_path / "home" / USER
    project = home / "projects" / "secret-model"
    project.mkdir(parents=True)
    (project / "working_layers.py").write_text(WORKING_MODULE)
    out = tmp_path / "ok.repro.zip"
    env = subprocess_env(HOME=str(home), USER=USER, PYTHONPATH=f"{project}:{TESTS}")
    result = run_python(PACK_WORKING.format(tests=str(TESTS), out=str(out)), cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "stablehlo." in text and 'loc("":' in text  # line numbers kept, file names empty
    assert ".py" not in text and "secret-model" not in text and USER not in text
    for name, data in _members_decompressed(out):
        for private in (str(home), USER, "secret-model"):
            assert private.encode() not in data, f"{private!r} leaked into {name}"


def test_fallback_strip_drops_every_location_jax_wrote():
    """`without_locations` (used when a file name survives the export) leaves no path."""
    import jax
    import jax.numpy as jnp

    from reprokit.record._stablehlo import _PYTHON_FILE, without_locations

    exported = jax.export.export(jax.jit(lambda x: jnp.tanh(x) * 2))(jnp.ones(3))
    assert _PYTHON_FILE in exported.mlir_module_serialized  # jax names this test file
    assert _PYTHON_FILE not in without_locations(exported)
