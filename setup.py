"""Builds the native codec ``immucore._native`` from ext/ (Cython -> C, linked to OpenSSL's libcrypto).

libcrypto is used for SHA-256 because it picks the fastest kernel the CPU has (SHA-NI, AVX2) and is
on every machine this project runs on (Debian's libssl-dev); a clear error says so if it is not.
``IMMUCORE_DEBUG=1`` compiles with Cython's bounds checks on.
"""
import os
import sys

from setuptools import Extension, setup

HEADER = "openssl/sha.h"
if not any(os.path.exists(os.path.join(d, HEADER)) for d in ("/usr/include", "/usr/local/include",
                                                               "/opt/homebrew/include")):
    sys.stderr.write("immucore: OpenSSL headers not found (openssl/sha.h); install them first, "
                     "e.g. `apt-get install libssl-dev`\n")

from Cython.Build import cythonize  # noqa: E402  (a build requirement, see pyproject.toml)

debug = os.environ.get("IMMUCORE_DEBUG") == "1"
extensions = [
    Extension(
        "immucore._native",
        sources=["ext/immucore/_native.pyx"],
        include_dirs=["ext"],
        libraries=["crypto"],
        extra_compile_args=["-O3"] + (["-g"] if debug else []),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        language_level=3,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "cdivision": True,
        },
    )
)
