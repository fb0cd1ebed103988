"""Builds the optional native kernel (tvq_cli/quant/_native.c); everything else is in
pyproject.toml. Without a C compiler the build goes on without it and pack runs the torch
reference of the same arithmetic (same archive bytes, several times slower)."""

import sys

from setuptools import Extension, setup

FLAGS = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "tvq_cli.quant._native",
            ["tvq_cli/quant/_native.c"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ]
)
