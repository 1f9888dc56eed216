"""deploy/install_debian_package.sh (what deploy/install_etcd.sh and bench/install_redis.sh
run): two installs started at once, as two test workers may start them, run one after the
other, and the second finds the program the first installed. An apt-get of this test's own
comes first on PATH: it installs nothing on the machine, and notes each install and any
overlap."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "install_debian_package.sh"
PROGRAM = "quotad-test-installed-program"
SCRIPT_TIMEOUT_S = 300.0
"""Above the script's lock wait (120 s), in case a real install holds the lock meanwhile."""

FAKE_APT_GET = """#!/bin/sh
# apt-get for the test: "update" does nothing; "install" notes itself (and whether another
# install was under way), takes a second, then puts the program on PATH.
case " $* " in
  *" install "*)
    if [ -e "$FAKE_APT_BUSY" ]; then echo overlap >>"$FAKE_APT_LOG"; fi
    touch "$FAKE_APT_BUSY"
    echo install >>"$FAKE_APT_LOG"
    sleep 1
    printf '#!/bin/sh\\necho installed 1.0\\n' >"$FAKE_BIN/$FAKE_PROGRAM"
    chmod 755 "$FAKE_BIN/$FAKE_PROGRAM"
    rm -f "$FAKE_APT_BUSY"
    ;;
esac
exit 0
"""


def test_two_installs_at_once_run_one_after_the_other_and_install_once(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("the script installs only as root")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    apt_get = fake_bin / "apt-get"
    apt_get.write_text(FAKE_APT_GET)
    apt_get.chmod(0o755)
    log = tmp_path / "apt.log"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
           "FAKE_APT_LOG": str(log), "FAKE_APT_BUSY": str(tmp_path / "busy"),
           "FAKE_BIN": str(fake_bin), "FAKE_PROGRAM": PROGRAM}

    installs = [subprocess.Popen(["bash", str(SCRIPT), "quotad-test-package", PROGRAM],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
                for _ in range(2)]
    outcomes = [install.communicate(timeout=SCRIPT_TIMEOUT_S) for install in installs]

    for install, (stdout, stderr) in zip(installs, outcomes):
        assert install.returncode == 0, stderr
    assert log.read_text().split() == ["install"], "one install, and no overlap"
    assert (fake_bin / PROGRAM).exists()
    assert sum("installed 1.0" in stdout for stdout, _ in outcomes) == 1, (
        "the install that ran prints the program's version; the other found it on PATH")
