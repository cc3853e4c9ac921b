"""Shim for tools that still run ``python setup.py ...`` or look for a setup.py at the top.

Every piece of package metadata (name, version, dependencies, package data) is in
pyproject.toml; ``pip install .`` reads it from there and never needs this file.
"""
import setuptools

setuptools.setup()
