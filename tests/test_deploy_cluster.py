"""deploy/k8s/cluster/quotad-cluster.yaml, checked without Kubernetes: its shape (the pod ordinal is the shard
id, each pod its own claim, grpc.health.v1 readiness, the map's addresses the pods' names), and
its commands run as written against a real etcd on loopback: the Job's `quotad cluster init`,
then the StatefulSet's `quotad serve` once per ordinal, with Kubernetes' $(SHARD_ID) put in
as Kubernetes would, and only addresses and the data directory changed for the test's own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import quotad_client as qc
from quotad.cluster.etcd_process import free_ports
from quotad.testing import ServerProcess
from quotad_contract.shards import ShardMap, slot_of
from server_process import ROOT

MANIFEST = ROOT / "deploy" / "k8s" / "cluster" / "quotad-cluster.yaml"
COMMAND_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
ADMIN_KEY = "admin-" + "d" * 32
_K8S_VARIABLE = re.compile(r"\$\((\w+)\)")


def documents() -> dict[str, dict]:
    found = {document["kind"]: document
             for document in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8"))}
    assert set(found) == {"Service", "Job", "StatefulSet"}, set(found)
    return found


def container_of(workload: dict) -> dict:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[index + 1] for index, word in enumerate(argv) if word == flag]


def flag_value(argv: list[str], flag: str) -> str:
    [value] = flag_values(argv, flag)
    return value


def replaced(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """argv with the values of each occurrence of flag replaced, in order."""
    changed, remaining = list(argv), iter(values)
    for index, word in enumerate(argv):
        if word == flag:
            changed[index + 1] = next(remaining)
    return changed


def expanded(argv: list[str], env: dict[str, str]) -> list[str]:
    """$(NAME) put in from env, as Kubernetes does in a container's command."""
    return [_K8S_VARIABLE.sub(lambda match: env[match[1]], word) for word in argv]


def test_the_pod_ordinal_is_the_shard_id_and_each_pod_has_its_claim_and_health_readiness():
    found = documents()
    service, statefulset = found["Service"], found["StatefulSet"]
    init = container_of(found["Job"])["command"]
    container = container_of(statefulset)
    serve = container["command"]
    assert init[:3] == ["quotad", "cluster", "init"] and serve[:2] == ["quotad", "serve"]
    assert flag_value(init, "--cluster") == flag_value(serve, "--cluster")
    assert flag_value(init, "--cluster").startswith("etcd://")
    assert flag_value(serve, "--shard-id") == "$(SHARD_ID)"
    [shard_id] = [variable for variable in container["env"] if variable["name"] == "SHARD_ID"]
    assert shard_id["valueFrom"]["fieldRef"]["fieldPath"] == \
        f"metadata.labels['{POD_INDEX_LABEL}']"
    # one --address per shard, each the pod of that ordinal through the headless Service
    replicas = statefulset["spec"]["replicas"]
    port = int(flag_value(serve, "--listen").rsplit(":", 1)[1])
    name, service_name = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    assert int(flag_value(init, "--shards")) == replicas
    assert flag_values(init, "--address") == [
        f"{name}-{ordinal}.{service_name}:{port}" for ordinal in range(replicas)]
    assert service["metadata"]["name"] == service_name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    # readiness is grpc.health.v1 on the port it serves; data on the pod's own claim
    assert container["readinessProbe"]["grpc"]["port"] == port
    ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    assert ports["grpc"] == port
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": flag_value(serve, "--data-dir")} \
        in container["volumeMounts"]
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert re.search(r"^# Depends on: an etcd", MANIFEST.read_text(encoding="utf-8"), re.M)
    stated = re.search(r"^# Relies on: (.*)$", MANIFEST.read_text(encoding="utf-8"), re.M)
    assert stated is not None and "quotad cluster init" in stated[1] \
        and "quotad serve" in stated[1]


@pytest.mark.parametrize("command", [("cluster", "init"), ("serve",)], ids=" ".join)
def test_every_flag_the_manifest_uses_is_in_the_commands_help(command: tuple[str, ...]):
    found = documents()
    argv = (container_of(found["Job"])["command"] if command[0] == "cluster"
            else container_of(found["StatefulSet"])["command"])
    done = subprocess.run([sys.executable, "-m", "quotad", *command, "--help"],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    used = {word for word in argv if word.startswith("--")}
    assert used and all(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", done.stdout)
                        for flag in used), used


def _authenticates(client: qc.QuotaClient) -> bool:
    try:
        client.list_plans()
    except qc.Unauthenticated:
        return False
    return True


def test_the_manifests_commands_make_a_cluster_whose_shards_serve_their_users(tmp_path, etcd):
    found = documents()
    replicas = found["StatefulSet"]["spec"]["replicas"]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(replicas)]
    target = f"etcd://{etcd.endpoint}/k8s-{int(time.time() * 1000) % 100000}"
    init = replaced(container_of(found["Job"])["command"], "--address", addresses)
    init = replaced(init, "--cluster", [target])
    done = subprocess.run([sys.executable, "-m", "quotad", *init[1:]], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    shard_map = ShardMap.from_json(done.stdout)
    assert [shard.address for shard in shard_map.shards] == addresses
    again = subprocess.run([sys.executable, "-m", "quotad", *init[1:]], capture_output=True,
                           text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)
    assert again.returncode == 2  # the Job run again changes nothing

    serve = container_of(found["StatefulSet"])["command"]
    shards = []
    try:
        for ordinal, address in enumerate(addresses):  # each pod: its ordinal, its claim
            argv = expanded(serve, {"SHARD_ID": str(ordinal)})
            argv = replaced(argv, "--cluster", [target])
            argv = replaced(argv, "--data-dir", [str(tmp_path / f"data-{ordinal}")])
            argv = replaced(argv, "--metrics-listen", ["127.0.0.1:0"])
            argv = replaced(argv, "--listen", [address])
            # with the admin key, as the manifest's Secret gives each pod
            process = ServerProcess(tmp_path / f"data-{ordinal}", extra_args=tuple(argv[2:]),
                                    env={"QUOTAD_ADMIN_KEY": ADMIN_KEY})
            shards.append(process.launch(address))
        for process in shards:
            process.wait_for("serving", COMMAND_TIMEOUT_S)
        for address in addresses:  # what the readiness probe asks
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        with qc.QuotaClient(addresses[-1], api_key=ADMIN_KEY) as admin:
            key = admin.create_key("secret", app="default").secret  # made on one shard,
        for address in addresses:  # taken by every one, within moments
            with qc.QuotaClient(address, api_key=key) as direct:
                deadline = time.monotonic() + COMMAND_TIMEOUT_S
                while not _authenticates(direct):
                    assert time.monotonic() < deadline, f"the key never reached {address}"
                    time.sleep(0.1)
        with qc.QuotaClient(cluster=target, api_key=key) as client:
            client.upsert_plan({"id": "p", "limit_groups": [
                {"key": "t", "quota": 100, "window": "day"}]})
            owners = {}
            for number in range(200):  # users until every shard has one
                user = f"user-{number}"
                owners.setdefault(shard_map.owner(slot_of("default", user)).shard_id, user)
                if len(owners) == replicas:
                    break
            assert sorted(owners) == list(range(replicas))

            def subscribed(user: str) -> bool:
                try:
                    client.subscribe(user, "p")
                except qc.QuotadError:
                    return False  # the plan has not reached that shard yet
                return True

            deadline = time.monotonic() + COMMAND_TIMEOUT_S
            for user in owners.values():
                while not subscribed(user):
                    assert time.monotonic() < deadline, f"the plan never reached {user}'s shard"
                    time.sleep(0.1)
                with client.reserve(user, "chat", 7) as hold:
                    hold.actual = 5
                assert client.usage(user).counter("t").used == 5
    finally:
        for process in shards:
            process.close()
