"""deploy/ cannot build or run a container here, so what it relies on is checked instead: every
`quotad ...` command line the Dockerfile, the compose file, the systemd unit and the
StatefulSet run is read out of the file, parsed by quotad's own command line, and run as
written against a real server (addresses, the data directory and the plans' path changed for
the test's own): the serve commands serve (with the admin key their comments ask for, and
metrics Prometheus can scrape), and the health checks say 0 to that server, 1 to a closed port.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from quotad import cli
from quotad.core import limits
from server_process import ROOT, ServerProcess

DEPLOY = ROOT / "deploy"
FILES_WITH_COMMANDS = ("Dockerfile", "compose.yaml", "quotad.service", "k8s/statefulset.yaml")
IMAGE_PLANS = "/etc/quotad/plans.toml"
"""Where the Dockerfile copies examples/plans.toml (and the unit's install steps put it)."""
ADMIN_KEY = "ak_" + "d" * 40
COMMAND_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 10.0


# --- reading the files ----------------------------------------------------------------------

def dockerfile_commands(text: str) -> list[list[str]]:
    """The exec-form CMDs (the server's, the HEALTHCHECK's), continuation lines joined."""
    joined = text.replace("\\\n", " ")
    return [json.loads(match) for match in re.findall(r"\bCMD\s+(\[.*\])\s*$", joined, re.M)]


def compose_commands(text: str) -> list[list[str]]:
    quotad = yaml.safe_load(text)["services"]["quotad"]
    test = quotad["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return [quotad["command"], test[1:]]


def statefulset_commands(text: str) -> list[list[str]]:
    commands = []
    for container in yaml.safe_load(text)["spec"]["template"]["spec"]["containers"]:
        commands.append([*container.get("command", []), *container.get("args", [])])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "exec" in container.get(probe, {}):
                commands.append(container[probe]["exec"]["command"])
    return commands


def systemd_commands(text: str) -> list[list[str]]:
    """Each Exec*= line's command; in an `sh -c` script, each quotad command in it."""
    commands = []
    for line in re.findall(r"^Exec\w+=(.*)$", text, re.M):
        words = shlex.split(line)
        if words[:2] != ["/bin/sh", "-c"]:
            commands.append(words)
            continue
        for piece in re.split(r"&&|\|\||;", words[2]):
            piece_words = shlex.split(piece)
            starts = [index for index, word in enumerate(piece_words)
                      if Path(word).name == "quotad"]
            if starts:
                commands.append(piece_words[starts[0]:])
    return commands


READERS = {"Dockerfile": dockerfile_commands, "compose.yaml": compose_commands,
           "quotad.service": systemd_commands, "k8s/statefulset.yaml": statefulset_commands}


def quotad_commands(name: str) -> list[list[str]]:
    """The file's quotad command lines, as argv without the program: ["serve", "--listen", …]."""
    commands = READERS[name]((DEPLOY / name).read_text(encoding="utf-8"))
    return [command[1:] for command in commands if Path(command[0]).name == "quotad"]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def for_the_test(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """argv with the values of the flags named in replacements replaced."""
    changed = list(argv)
    for flag, value in replacements.items():
        if flag in changed:
            changed[changed.index(flag) + 1] = value
    return changed


# --- what the files say ---------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES_WITH_COMMANDS)
def test_each_deploy_file_states_the_quotad_commands_it_relies_on(name: str):
    text = (DEPLOY / name).read_text(encoding="utf-8")
    stated = re.search(r"^# Relies on: (.*)$", text, re.M)
    assert stated is not None, f"{name} has no '# Relies on:' comment"
    subcommands = {command[0] for command in quotad_commands(name)}
    assert subcommands == {"serve", "health"}
    assert set(re.findall(r"quotad (\w+)", stated[1])) == subcommands


@pytest.mark.parametrize("name", FILES_WITH_COMMANDS)
def test_quotads_command_line_accepts_every_deploy_command(name: str):
    for argv in quotad_commands(name):
        args = cli.parser().parse_args(argv)  # an unknown flag or a bad value: SystemExit
        assert args.command == argv[0]


@pytest.mark.parametrize("subcommand", ["serve", "health"])
def test_the_help_of_each_deployed_subcommand_names_every_flag_the_files_use(subcommand: str):
    done = subprocess.run([sys.executable, "-m", "quotad", subcommand, "--help"],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    used = {word for name in FILES_WITH_COMMANDS for argv in quotad_commands(name)
            if argv[0] == subcommand for word in argv if word.startswith("--")}
    spelled_out = {flag for flag in used  # whole, not a prefix argparse would also take
                   if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", done.stdout)}
    assert used and spelled_out == used, used - spelled_out


def test_the_container_runs_as_a_non_root_user_with_the_data_directory_a_volume():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:[\d.]+-slim$", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)[1]
    assert user not in ("root", "0")
    [serve] = [argv for argv in quotad_commands("Dockerfile") if argv[0] == "serve"]
    assert re.search(rf"^VOLUME {re.escape(flag_value(serve, '--data-dir'))}$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*CMD \[\"quotad\", \"health\"", text.replace("\\\n", " "),
                     re.M)


def test_compose_runs_the_images_command_and_prometheus_scrapes_its_metrics_port():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert sorted(quotad_commands("compose.yaml")) == sorted(quotad_commands("Dockerfile"))
    [serve, _] = quotad_commands("compose.yaml")
    metrics_port = flag_value(serve, "--metrics-listen").rsplit(":", 1)[1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [target for job in prometheus["scrape_configs"]
               for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"quotad:{metrics_port}"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in \
        compose["services"]["prometheus"]["volumes"]
    assert compose["services"]["quotad"]["volumes"] == [
        f"quotad-data:{flag_value(serve, '--data-dir')}"]
    assert int(compose["services"]["quotad"]["stop_grace_period"].removesuffix("s")) \
        > limits.DRAIN_S


def test_the_systemd_unit_runs_as_its_user_restarts_on_failure_and_outwaits_the_drain():
    unit = dict(re.findall(r"^(\w+)=(.*)$", (DEPLOY / "quotad.service").read_text(), re.M))
    assert unit["User"] == "quotad" and unit["Group"] == "quotad"
    assert unit["Restart"] == "on-failure" and unit["KillSignal"] == "SIGTERM"
    assert int(unit["TimeoutStopSec"]) > limits.DRAIN_S
    [serve] = [argv for argv in quotad_commands("quotad.service") if argv[0] == "serve"]
    assert flag_value(serve, "--data-dir").startswith(f"/var/lib/{unit['StateDirectory']}/")


def test_the_statefulset_keeps_its_data_on_a_claim_and_the_service_reaches_its_ports():
    statefulset = yaml.safe_load((DEPLOY / "k8s/statefulset.yaml").read_text(encoding="utf-8"))
    service = yaml.safe_load((DEPLOY / "k8s/service.yaml").read_text(encoding="utf-8"))
    assert (statefulset["kind"], service["kind"]) == ("StatefulSet", "Service")
    pod = statefulset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > limits.DRAIN_S
    [serve, health] = quotad_commands("k8s/statefulset.yaml")
    assert container["readinessProbe"]["exec"]["command"][1:] == health
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": flag_value(serve, "--data-dir")} \
        in container["volumeMounts"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": int(flag_value(serve, "--listen").rsplit(":", 1)[1]),
                     "metrics": int(flag_value(serve, "--metrics-listen").rsplit(":", 1)[1])}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]


# --- the commands, run ----------------------------------------------------------------------

SERVE_COMMANDS = sorted({tuple(argv) for name in FILES_WITH_COMMANDS
                         for argv in quotad_commands(name) if argv[0] == "serve"})
HEALTH_COMMANDS = sorted({tuple(argv) for name in FILES_WITH_COMMANDS
                          for argv in quotad_commands(name) if argv[0] == "health"})


@pytest.fixture(scope="module", params=SERVE_COMMANDS, ids=lambda argv: " ".join(argv[1:5]))
def deployed_server(request, tmp_path_factory) -> Iterator[ServerProcess]:
    """The file's serve command as written, on loopback, a test data directory and the
    example plans, with the admin key the files ask for."""
    argv = for_the_test(list(request.param), {
        "--listen": "127.0.0.1:0", "--metrics-listen": "127.0.0.1:0",
        "--data-dir": str(tmp_path_factory.mktemp("deployed") / "data"),
        "--plans": str(ROOT / "examples" / "plans.toml")})
    assert flag_value(list(request.param), "--plans") in (IMAGE_PLANS,)
    process = ServerProcess(Path(flag_value(argv, "--data-dir")), plans=None,
                            extra_args=tuple(argv[1:]), env={"QUOTAD_ADMIN_KEY": ADMIN_KEY})
    process.start("127.0.0.1:0")
    try:
        yield process
    finally:
        process.close()


def run_quotad(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad", *argv], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def test_each_deployed_serve_command_serves_its_plans_and_metrics(deployed_server):
    serving = deployed_server.last("serving")
    assert serving["keys"] == "on" and serving["plans_loaded"] > 0
    with urllib.request.urlopen(f"http://{serving['metrics']}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        assert b"quotad_" in response.read()


@pytest.mark.parametrize("health", HEALTH_COMMANDS, ids=" ".join)
def test_each_deployed_health_check_exits_0_for_the_deployed_server(deployed_server, health):
    done = run_quotad(for_the_test(list(health), {"--target": deployed_server.address}))
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


@pytest.mark.parametrize("health", HEALTH_COMMANDS, ids=" ".join)
def test_each_deployed_health_check_exits_1_for_a_closed_port(health):
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{bound.getsockname()[1]}"
        done = run_quotad(for_the_test(list(health), {"--target": target}))
    assert done.returncode == 1
    assert f"no answer from {target}" in done.stderr
