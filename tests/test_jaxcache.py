"""nfjax.jaxcache: where the compilation cache lives, that it is written, and its size cap."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT
from nfjax import jaxcache


def _run(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NFJAX_CACHE_DIR", str(tmp_path / "c"))
    assert jaxcache.default_dir() == tmp_path / "c"
    for off in ("off", "0", ""):
        monkeypatch.setenv("NFJAX_CACHE_DIR", off)
        assert jaxcache.default_dir() is None
    monkeypatch.delenv("NFJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jaxcache.default_dir() == tmp_path / "xdg" / "nfjax" / "jax"


def test_a_compiled_program_is_written_and_read_back(tmp_path):
    """A fresh process with the cache on writes the program it compiles; a second process
    finds it there (JAX counts a cache hit); with the cache off nothing is written."""
    code = ("import jax, jax.numpy as jnp\n"
            "from nfjax import jaxcache\n"
            "jaxcache.MIN_COMPILE_SECONDS = 0.0\n"
            "print(jaxcache.enable())\n"
            "hits = []\n"
            "jax.monitoring.register_event_listener(lambda e, **k: hits.append(e))\n"
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
            "print(sum('cache_hits' in e for e in hits))\n")
    cache = tmp_path / "cache"
    env = {"NFJAX_CACHE_DIR": str(cache), "JAX_COMPILATION_CACHE_DIR": ""}
    first = _run(code, env).splitlines()
    assert first[0] == str(cache)
    assert any(cache.iterdir())
    second = _run(code, env).splitlines()
    assert int(second[1]) >= 1, second
    off = _run(code, {**env, "NFJAX_CACHE_DIR": "off"}).splitlines()
    assert off[0] == "None"


def test_enable_gives_up_quietly_on_an_unusable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = "from nfjax import jaxcache; print(jaxcache.enable())"
    env = {"NFJAX_CACHE_DIR": str(blocker / "sub"), "JAX_COMPILATION_CACHE_DIR": ""}
    assert _run(code, env) == "None"


def test_prune_removes_the_oldest_entries_over_the_cap(tmp_path):
    for i in range(10):
        f = tmp_path / f"e{i}"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 + i, 1000 + i))
    jaxcache._prune(tmp_path, 2000)                 # under the cap: nothing goes
    assert len(list(tmp_path.iterdir())) == 10
    jaxcache._prune(tmp_path, 800)                  # 1000 bytes: down to <= 600, oldest first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"e{i}" for i in range(4, 10)]


def test_with_filelock_jax_limits_the_size_itself(tmp_path):
    """Where the ``filelock`` package is installed, JAX's own locked, size-limited cache is
    used (a stand-in module here: nfjax does not depend on filelock)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "filelock.py").write_text(
        "class FileLock:\n"
        "    def __init__(self, path): self.path = path\n"
        "    def acquire(self, timeout=None): pass\n"
        "    def release(self): pass\n"
        "SoftFileLock = FileLock\n")
    code = ("import jax, jax.numpy as jnp\n"
            "from nfjax import jaxcache\n"
            "jaxcache.MIN_COMPILE_SECONDS = 0.0\n"
            "print(jaxcache.enable())\n"
            "print(jax.config.jax_compilation_cache_max_size)\n"
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n")
    cache = tmp_path / "cache"
    out = _run(code, {"NFJAX_CACHE_DIR": str(cache), "JAX_COMPILATION_CACHE_DIR": "",
                      "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.splitlines() == [str(cache), str(jaxcache.MAX_BYTES)]
    assert any(p.name.endswith("-cache") for p in cache.iterdir())
