"""setup.py exists only for the optional CUDA extension in csrc/ (a later step).

A plain `pip install -e .` reads everything from pyproject.toml and never needs nvcc.
"""
from setuptools import setup

setup()
