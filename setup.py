"""Build script: the pure-Python package plus the optional C++ (pybind11) packer.

The extension is optional by design: a machine without a compiler still installs dpo_fast,
and `dpo_fast.data.packing` falls back to its pure-Python packer (identical output).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds the C++ extensions when it can; a failure is reported, never fatal."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure must not fail the install
            print(f"dpo_fast: C++ packer not built ({exc}); the pure-Python packer will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"dpo_fast: could not build {ext.name} ({exc}); using the pure-Python fallback", file=sys.stderr)


def extensions():
    """The C++ packer, when its source and pybind11 are there (pybind11 is a build requirement).

    No ninja: the extension is a single translation unit, so neither ninja nor pybind11's ParallelCompile
    would run anything in parallel; plain setuptools compiles it in about ten seconds.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join("csrc", "packing.cpp")
    if not os.path.exists(os.path.join(here, source)):
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("dpo_fast: pybind11 missing; the pure-Python packer will be used", file=sys.stderr)
        return []
    # -O3 is GCC/Clang spelling; MSVC ignores it with a warning and uses its own release flags.
    return [Pybind11Extension("dpo_fast._packing_cpp", [source], cxx_std=17, extra_compile_args=["-O3"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
