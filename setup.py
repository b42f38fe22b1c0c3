"""Only hands the cffi extension (pplx._native) to setuptools; metadata: pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
