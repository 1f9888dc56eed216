"""`quotad cluster up`: etcd and 3 shards from one command on loopback, reached through the
target it prints; SIGINT stops them all and exits 0; the same data directory starts the same
cluster again, data kept; bad flags are refused with nothing started."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import quotad_client as qc
from quotad.cluster import etcd_process
from quotad.cluster.etcd_process import free_port, free_ports
from quotad_contract.shards import slot_of, split_evenly
from server_process import EXAMPLE_PLANS, ROOT

UP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0
CALL_TIMEOUT_S = 5.0


def cluster_up(data_dir: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "quotad", "cluster", "up", "--data-dir",
                             str(data_dir), *flags], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def printed_target(process: subprocess.Popen[str]) -> str:
    """The first line on stdout (the target), within UP_TIMEOUT_S."""
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(UP_TIMEOUT_S)
    if not lines or not lines[0].strip():
        process.kill()
        raise AssertionError(f"cluster up printed no target: {process.communicate()[1][-3000:]}")
    return lines[0].strip()


def interrupt(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
    return process.returncode, stderr


def closed(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) != 0


def test_cluster_up_runs_etcd_and_3_shards_until_sigint_and_again_with_its_data(tmp_path, etcd):
    # (the module's etcd fixture installs etcd when it is missing; cluster up runs its own)
    data_dir = tmp_path / "cluster"
    flags = ("--shards", "3", "--etcd-port", "0", "--port", "0", "--lease-ttl-s", "2",
             "--plans", str(EXAMPLE_PLANS))
    process = cluster_up(data_dir, *flags)
    try:
        target = printed_target(process)
        assert target.startswith("etcd://127.0.0.1:") and target.endswith("/local")
        layout = json.loads((data_dir / "cluster.json").read_text())
        shard_map = split_evenly(layout["addresses"])
        users = {shard_map.owner(slot_of("default", f"u{n}")).shard_id: f"u{n}"
                 for n in range(100)}
        assert set(users) == {0, 1, 2}
        with qc.QuotaClient(cluster=target, timeout_s=CALL_TIMEOUT_S) as client:
            for user in users.values():
                client.subscribe(user, "free")
                hold = client.reserve(user, "openai.chat", 100)
                client.commit(hold.reservation_id, 30)
        code, stderr = interrupt(process)
        assert code == 0, stderr
        assert "stopped" in stderr
        assert all(closed(address) for address in layout["addresses"])
        assert closed(f"127.0.0.1:{layout['etcd_client_port']}")

        process = cluster_up(data_dir, *flags)  # the same cluster again, its data kept
        assert printed_target(process) == target
        with qc.QuotaClient(cluster=target, timeout_s=CALL_TIMEOUT_S) as client:
            for user in users.values():
                assert client.usage(user)["tokens"].used == 30
        code, stderr = interrupt(process)
        assert code == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=STOP_TIMEOUT_S)


@pytest.mark.parametrize(("flags", "named"), [
    (("--shards", "0"), "--shards must be 1 to 16"),
    (("--shards", "17"), "--shards must be 1 to 16"),
    (("--shards", "2", "--port", "70000"), "--port must be"),
    (("--shards", "2", "--name", "a/b"), "--name"),
    (("--shards", "2", "--lease-ttl-s", "1"), "--lease-ttl-s must be"),
])
def test_cluster_up_refuses_bad_flags_with_nothing_started(tmp_path, flags, named):
    done = subprocess.run([sys.executable, "-m", "quotad", "cluster", "up", "--data-dir",
                           str(tmp_path / "cluster"), *flags], capture_output=True, text=True,
                          timeout=UP_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not (tmp_path / "cluster").exists()


def test_cluster_up_refuses_another_shard_count_for_a_data_dir_that_holds_a_cluster(tmp_path):
    data_dir = tmp_path / "cluster"
    data_dir.mkdir()
    (data_dir / "cluster.json").write_text(json.dumps({
        "name": "local", "etcd_client_port": free_port(), "etcd_peer_port": free_port(),
        "addresses": ["127.0.0.1:1", "127.0.0.1:2"]}))
    done = subprocess.run([sys.executable, "-m", "quotad", "cluster", "up", "--data-dir",
                           str(data_dir), "--shards", "3"], capture_output=True, text=True,
                          timeout=UP_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 2 and "holds a cluster of 2 shard(s), not 3" in done.stderr


def test_picked_ports_are_free_distinct_and_below_the_ports_the_kernel_hands_out():
    """Ports named before their servers start (a cluster's map) are picked where no outgoing
    connection or bind to port 0 can take them meanwhile."""
    first_ephemeral = etcd_process._first_ephemeral_port()
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(1024 <= port < first_ephemeral for port in ports)
    holders = []
    try:
        for port in ports:  # free now: each binds
            holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            holders.append(holder)
            holder.bind(("127.0.0.1", port))
    finally:
        for holder in holders:
            holder.close()


def test_port_picks_read_the_kernels_range_and_take_its_own_picks_when_too_few_lie_below(
        tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_process, "EPHEMERAL_PORTS_FILE", tmp_path / "missing")
    assert etcd_process._first_ephemeral_port() == etcd_process.EPHEMERAL_PORTS_FIRST_DEFAULT
    low = tmp_path / "ip_local_port_range"
    low.write_text("1500\t60999\n")  # 476 ports below it: fewer than PICKED_PORTS_MIN
    monkeypatch.setattr(etcd_process, "EPHEMERAL_PORTS_FILE", low)
    assert etcd_process._first_ephemeral_port() == 1500
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(port >= 1500 for port in ports)


def test_port_picks_give_up_after_their_tries_with_what_they_found():
    """An address no port can be bound on (not this machine's): every try fails, and after
    PORT_PICK_TRIES_MAX of them free_ports says so rather than trying on."""
    with pytest.raises(OSError, match=f"found 0 of 2 free ports below [0-9]+ in "
                                      f"{etcd_process.PORT_PICK_TRIES_MAX} tries"):
        free_ports(2, host="192.0.2.1")
