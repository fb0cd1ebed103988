"""Builds the optional native kernels (tvq_cli/quant/_native.c: pack's hot loops;
tvq_cli/quant/_rans.c: the low-rate codec's entropy coder); everything else is in
pyproject.toml. Without a C compiler the build goes on without them and tvq runs the torch and
numpy references of the same arithmetic (same archive bytes, slower)."""

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
        ),
        Extension(
            "tvq_cli.quant._rans",
            ["tvq_cli/quant/_rans.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
