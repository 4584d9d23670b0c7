"""The CPU kernels are built portably by default: x86-64-v3 (AVX2 + FMA), not -march=native, so that an
extension built on an AVX-512 login node does not die with SIGILL on older compute nodes."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megaclass.ops import kernels

ROOT = Path(__file__).resolve().parents[1]


def _cpu_arch_function():
    """setup.py's `_cpu_arch`, without running setup() (which importing setup.py would do)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_cpu_arch")
    namespace = {"os": os, "subprocess": subprocess}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["_cpu_arch"]


def test_default_cpu_arch_is_portable(monkeypatch):
    cpu_arch = _cpu_arch_function()
    monkeypatch.delenv("MEGACLASS_CPU_ARCH", raising=False)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    host_avx2 = " avx2" in flags and " fma" in flags and shutil.which(os.environ.get("CXX", "c++"))
    assert cpu_arch() == ("x86-64-v3" if host_avx2 else None)
    monkeypatch.setenv("MEGACLASS_CPU_ARCH", "native")  # the opt-in
    assert cpu_arch() == "native"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(bool(os.environ.get("MEGACLASS_CPU_ARCH")), reason="MEGACLASS_CPU_ARCH chooses the build's ISA")
def test_built_extension_has_no_avx512_code():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = kernels.extension()
    if ext is None:
        pytest.skip("megaclass._C is not built")
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext.__file__], capture_output=True,
                                 text=True, check=True).stdout
    assert "%zmm" not in disassembly  # AVX-512 registers: SIGILL on an AVX2-only CPU


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter that has imported nothing of torch or megaclass yet."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_extension_imports_on_its_own():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kernels.extension() is None:
            pytest.skip("megaclass._C is not built")
    # the library links against libc10/libtorch, which only `import torch` loads: megaclass imports it first
    result = _fresh_python("import megaclass._C as c, torch; print(c.__file__); "
                           "print(all(hasattr(torch.ops.megaclass, op) for op in "
                           "('lce_chunk_stats', 'lce_chunk_grad_', 'lce_chunk_stats_grad_')))")
    assert result.returncode == 0, result.stderr
    path, registered = result.stdout.split()
    assert Path(path).parent == ROOT / "megaclass" and registered == "True"


def test_importing_the_package_does_not_import_torch():
    """`megaclass --help` and the data tools start without torch; only the extension pulls it in."""
    result = _fresh_python("import sys, megaclass; print('torch' in sys.modules)")
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
