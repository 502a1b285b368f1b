"""Build nfkernels._C: C++ CPU ops always, CUDA sources only when torch has CUDA and nvcc is found.

If no compiler is available the package still installs; nfkernels then falls back to its
pure-torch reference ops and warns once at import.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"


def _extensions():
    if os.environ.get("NFGEN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("nfgen: torch is not installed; building without nfkernels._C", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("nfgen: no C++ compiler found; building without nfkernels._C", file=sys.stderr)
        return [], {}

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cuda = sorted(glob.glob("csrc/cuda/*.cu"))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++17", "-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3"] + openmp
    with_cuda = (
        bool(cuda)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("NFGEN_NO_CUDA") != "1"
    )
    if with_cuda:
        nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
                      "-gencode=arch=compute_80,code=sm_80"]
        ext = CUDAExtension(
            "nfkernels._C",
            cpp + cuda,
            extra_compile_args={"cxx": cxx_flags + ["-DNFK_WITH_CUDA"], "nvcc": nvcc_flags + ["-DNFK_WITH_CUDA"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("nfkernels._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="nfgen",
    version=VERSION,
    description="Generate neural fields by predicting their weights with a transformer",
    packages=find_packages(include=["nfkernels", "nfkernels.*", "nfgen", "nfgen.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "triton"],
        "vision": ["torchvision"],
    },
    entry_points={"console_scripts": ["nfgen=nfgen.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
