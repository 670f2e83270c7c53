"""hf-taujp: task arithmetic with the τJp regularizer for the Hugging Face ecosystem.

All metadata (dependencies, extras, the console script, package data) is in pyproject.toml (PEP 621);
this file lets `python setup.py ...` and older tools find the project.
"""

from setuptools import setup

setup()
