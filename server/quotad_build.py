"""PEP 517 build backend: setuptools, after generating the gRPC stubs from protos/.

The stubs are never edited by hand and never committed: every build writes them anew from
protos/quotad/v1/quotad.proto, and tests/test_stubs.py fails when the installed ones drift.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (re-exported hooks)
    build_sdist,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

from quotad.protogen import generate_stubs

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    generate_stubs(ROOT / "protos", ROOT)
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    generate_stubs(ROOT / "protos", ROOT)
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
