"""quotad is Apache-2.0: the full text beside the code, and the package metadata says so."""

from __future__ import annotations

import tomllib

from server_process import ROOT


def test_the_license_is_apache_2_0_in_full_and_in_the_package_metadata():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
