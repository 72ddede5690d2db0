"""Only the optional C extension lives here; everything else is in pyproject.toml.

The extension is optional: on a machine without a compiler, ``pip install`` still succeeds and
inferscope runs on its pure-Python backend (``inferscope.backend()`` says which one is in use).
"""

import os

from setuptools import Extension, setup

extra_compile_args = [
    "-O2",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
]
extra_link_args: list[str] = []
if os.environ.get("INFERSCOPE_SANITIZE"):
    # e.g. INFERSCOPE_SANITIZE=address,undefined pip install -e .
    flag = "-fsanitize=" + os.environ["INFERSCOPE_SANITIZE"]
    extra_compile_args += [flag, "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link_args += [flag]

setup(
    ext_modules=[
        Extension(
            "inferscope._native._ringbuf",
            sources=["src/inferscope/_native/ringbuf.c"],
            depends=[
                "src/inferscope/_native/ringcore.h",
                "src/inferscope/_native/counters.h",
                "src/inferscope/_native/fold.h",
                "src/inferscope/_native/collector.h",
                "src/inferscope/_native/share.h",
            ],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            optional=os.environ.get("INFERSCOPE_REQUIRE_EXTENSION") != "1",
        )
    ]
)
