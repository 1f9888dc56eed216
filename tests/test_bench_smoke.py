"""The benchmarks run end to end (briefly), so that they cannot rot. Figures are not asserted
beyond being there and non-zero; the mix workload's denial rate is checked loosely."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import ROOT, bench_module

RUN_KEYS = {"seconds", "ops", "pairs", "ops_per_s", "pairs_per_s", "p50_ms", "p90_ms", "p99_ms",
            "p999_ms", "errors", "error_kinds", "outcomes", "denied_share", "histogram_counts",
            "throughput_ops_per_s", "latency_ms_by_op", "server_cpu_util", "client_cpu_util"}
MEDIAN_KEYS = {"ops_per_s", "pairs_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "errors",
               "runs"}


def _bench(tmp_path: Path, *args: str) -> dict:
    results = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--results", str(results), "--runs", "1",
         "--concurrency", "4", "--users", "50", "--call-timeout", "10", *args],
        capture_output=True, text=True, timeout=150, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| workload | target |" in result.stdout  # the final markdown table
    document = json.loads((results / "results.json").read_text())
    assert (results / "results.md").read_text() == document["table_markdown"]
    assert document["asymmetries"] and all(line in document["table_markdown"]
                                           for line in document["asymmetries"])
    if importlib.util.find_spec("matplotlib") is not None:
        for workload in document["workloads"]:
            for kind in ("latency", "throughput"):
                assert (results / f"{kind}-{workload}.png").stat().st_size > 0
    return document


def _check(document: dict, workloads: list[str],
           targets_of: set[str] | dict[str, set[str]]) -> None:
    """targets_of: the targets every workload ran on, or each workload's."""
    assert {"version", "config", "machine", "workloads", "skipped", "table_markdown"} <= set(
        document)
    assert document["finished"] is True
    assert document["machine"]["nproc"] >= 1 and document["machine"]["cpu_model"]
    assert list(document["workloads"]) == workloads
    for workload, entry in document["workloads"].items():
        targets = targets_of if isinstance(targets_of, set) else targets_of[workload]
        assert set(entry["targets"]) == targets
        assert set(entry["ratios"]) == targets - {"quotad"}
        for name, target in entry["targets"].items():
            where = f"{workload} on {name}"
            assert len(target["runs"]) == 1 and RUN_KEYS <= set(target["runs"][0]), where
            median = target["median"]
            assert MEDIAN_KEYS <= set(median), where
            assert median["errors"] == 0, (where, target["runs"][0]["error_kinds"])
            assert median["ops_per_s"] > 0, where
            assert 0 < median["p50_ms"] <= median["p99_ms"] <= median["p999_ms"], where
            if workload == "track":
                assert median["pairs_per_s"] is None, where
            else:
                assert median["pairs_per_s"] > 0, where
            outcomes = target["runs"][0]["outcomes"]
            assert not outcomes.get("unexpected_denials") and not outcomes.get(
                "unexpected_allowed"), (where, outcomes)
            if workload == "mix":  # designed for 10 % denied, 1 % left to expire
                assert 0.03 < median["denied_share"] < 0.2, (where, outcomes)
        for ratio in entry["ratios"].values():
            assert ratio["ops_per_s"] > 0


def test_the_bench_runs_every_workload_against_quotad_and_the_echo_peer(tmp_path: Path):
    # A Redis peer whose server binary is missing is skipped, with the reason recorded.
    document = _bench(tmp_path, "--workload", "all", "--seconds", "1.5",
                      "--peers", "echo,redis-none", "--redis-server", "/nonexistent/redis-server")
    _check(document, ["pairs", "release", "track", "mix", "credits"], {"quotad", "echo"})
    assert "redis-none" in document["skipped"]


def test_the_bench_runs_the_redis_peers_in_two_client_processes(tmp_path: Path):
    # redis-py is in the test extra; redis-server is installed from Debian's package when it
    # is missing (skipped, with the reason, only where that cannot be done: not root, no apt)
    install_server = bench_module("redis_peer").install_server
    why = install_server()
    if why is not None:
        pytest.skip(why)
    document = _bench(tmp_path, "--workload", "mix,credits", "--ops", "1500",
                      "--processes", "2", "--peers", "redis-always,redis-none")
    # the Redis peers run every workload but credits, which they have no balances for
    _check(document, ["mix", "credits"], {"mix": {"quotad", "redis-always", "redis-none"},
                                          "credits": {"quotad"}})
    assert document["skipped"] == {}
    assert document["skipped_workloads"]["credits"][0] == ["redis-always", "redis-none"]
    assert "Not run: redis-always and redis-none on credits" in document["table_markdown"]
    stated = " ".join(document["asymmetries"])
    assert "Redis is not pipelined" in stated and "no idempotency keys" in stated
    assert document["machine"]["redis_server"]


def test_the_bench_runs_clusters_by_shard_count_and_reports_cpu_per_operation(tmp_path: Path):
    # etcd is installed from Debian's package when it is missing (skipped, with the reason,
    # only where that cannot be done: not root, no apt), as for the cluster's own tests
    from etcd_server import install_etcd

    why = install_etcd()
    if why is not None:
        pytest.skip(why)
    document = _bench(tmp_path, "--workload", "pairs", "--seconds", "1.5", "--peers", "none",
                      "--shards", "1,2")
    _check(document, ["pairs"], {"quotad", "cluster-1", "cluster-2"})
    targets = document["workloads"]["pairs"]["targets"]
    for name in ("quotad", "cluster-1", "cluster-2"):
        assert targets[name]["median"]["server_cpu_us_per_op"] > 0, name
    assert [server["shards"] for server in targets["cluster-2"]["server"]] == [2]
    table = document["table_markdown"]
    assert "By shard count" in table and "| pairs | 2 |" in table
    harness = bench_module("harness")
    SHARDS_BENCH_MAX, build_parser = harness.SHARDS_BENCH_MAX, harness.build_parser
    assert build_parser().parse_args(["--shards", f"1,{SHARDS_BENCH_MAX}"]).shards == [
        1, SHARDS_BENCH_MAX]
    for bad in ("0", str(SHARDS_BENCH_MAX + 1), "2,2", "x"):
        refused = subprocess.run([sys.executable, "-m", "bench", "--shards", bad],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 2 and "--shards" in refused.stderr, bad


def test_the_bench_paces_clusters_at_a_rate_per_shard_and_reports_what_it_achieved(
        tmp_path: Path):
    # Open loop at a low pace: a check that the pacing works end to end (the rate asked is
    # reached within a loose bound, each shard answers its share), not a performance figure.
    from etcd_server import install_etcd

    why = install_etcd()
    if why is not None:
        pytest.skip(why)
    per_shard = 200
    document = _bench(tmp_path, "--workload", "pairs", "--seconds", "2", "--peers", "none",
                      "--shards", "1,2", "--zipf-s", "0", "--processes", "2",
                      "--ops-per-s-per-shard", str(per_shard))
    _check(document, ["pairs"], {"quotad", "cluster-1", "cluster-2"})
    assert document["config"]["ops_per_s_per_shard"] == per_shard
    targets = document["workloads"]["pairs"]["targets"]
    for name, shards in (("quotad", 1), ("cluster-1", 1), ("cluster-2", 2)):
        median, run = targets[name]["median"], targets[name]["runs"][0]
        asked = per_shard * shards
        assert median["asked_ops_per_s"] == asked, name
        assert 0.5 * asked <= median["ops_per_s"] <= 1.5 * asked, (name, median["ops_per_s"])
        assert 0 <= median["not_sent_share"] < 0.5, name
        assert median["server_cpu_us_per_op"] > 0 and median["ops_per_batch_rpc"] >= 1, name
        assert set(median["ranges"]) >= {"ops_per_s", "server_cpu_us_per_op"}, name
        if name != "quotad":  # what each shard answered: every shard its part
            by_shard = run["ops_per_s_by_shard"]
            assert sorted(by_shard) == [str(shard) for shard in range(shards)], name
            assert all(rate > 0.2 * per_shard for rate in by_shard.values()), (name, by_shard)
    table = document["table_markdown"]
    assert "Paced (open loop): 200 operations/s asked of each shard" in table
    assert "| pairs | 2 | 400 |" in table and "| pairs | 1 (alone) | 200 |" in table


def test_a_pace_the_clients_cannot_keep_is_counted_not_queued(tmp_path: Path):
    # 4 units in flight cannot carry 50,000 operations/s here: what is not sent is counted
    # and said, the run still ends on time, and the achieved rate is what was answered.
    from etcd_server import install_etcd

    why = install_etcd()
    if why is not None:
        pytest.skip(why)
    results = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--results", str(results), "--runs", "1",
         "--concurrency", "4", "--users", "50", "--workload", "pairs", "--seconds", "1",
         "--peers", "none", "--shards", "1", "--ops-per-s-per-shard", "50000", "--no-plots"],
        capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "behind: the clients did not send" in result.stdout
    median = json.loads((results / "results.json").read_text())[
        "workloads"]["pairs"]["targets"]["cluster-1"]["median"]
    assert median["not_sent_share"] > 0.5 and 0 < median["ops_per_s"] < 50_000
    run = json.loads((results / "results.json").read_text())[
        "workloads"]["pairs"]["targets"]["cluster-1"]["runs"][0]
    assert run["seconds"] < 3 and run["not_sent_busy_ops"] > 0


def test_the_bench_refuses_a_bad_pace_and_a_pace_without_shards(
        capsys: pytest.CaptureFixture[str]):
    harness = bench_module("harness")
    PACED_OPS_PER_S_MAX, build_parser, main = (harness.PACED_OPS_PER_S_MAX,
                                               harness.build_parser, harness.main)
    assert build_parser().parse_args(["--ops-per-s-per-shard", "1500"]).ops_per_s_per_shard \
        == 1500.0
    refusals = {
        "must be above 0": [["--shards", "1", "--ops-per-s-per-shard", bad]
                            for bad in ("0", "-200", "nan", "inf",
                                        str(PACED_OPS_PER_S_MAX * 2))],
        "expected operations per second": [["--shards", "1", "--ops-per-s-per-shard", "fast"]],
        "give --shards too": [["--ops-per-s-per-shard", "200"]],
        "give --seconds, not --ops": [["--shards", "1", "--ops-per-s-per-shard", "200",
                                       "--ops", "1000"]],
    }
    for why, cases in refusals.items():
        for argv in cases:
            with pytest.raises(SystemExit) as refused:
                main(argv)
            assert refused.value.code == 2, argv
            error = capsys.readouterr().err
            assert "--ops-per-s-per-shard" in error and why in error, (argv, error)


def test_the_bench_help_explains_every_flag():
    build_parser = bench_module("harness").build_parser
    parser = build_parser()
    flags = [action for action in parser._actions if action.option_strings]
    assert len(flags) > 15
    for action in flags:
        assert action.help and len(action.help) > 15, action.option_strings
    shown = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    for action in flags:
        assert action.option_strings[-1] in shown.stdout


@pytest.mark.parametrize("quotad_args", [(), ("--quotad-arg=--commit-delay-ms=2",),
                                         ("--quotad-arg=--log-level=debug",)],
                         ids=["defaults", "commit-delay", "access-log"])
def test_the_unary_bench_runs_against_its_own_servers_and_prints_a_ratio(
        quotad_args: tuple[str, ...]):
    result = subprocess.run(
        [sys.executable, "-m", "bench.unary", "--seconds", "0.5", "--runs", "1",
         "--concurrency", "2", "--pairs", *quotad_args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    row = lines[-1].split("|")
    assert row[0].strip() == "2"
    ratio, cpu_ratio = (float(figure) for figure in row[-1].split())
    assert float(row[1].split()[0]) > 0 and ratio > 0 and cpu_ratio > 0
    handler = [line for line in lines if "quotad's handler (access log)" in line]
    if "--quotad-arg=--log-level=debug" not in quotad_args:
        assert handler == []
        return
    # each Reserve's time in the handler is part of its time at the client: so is the median
    handler_ms, call_ms = (float(figure) for figure in re.findall(r"([0-9.]+) ms", handler[0]))
    # the call p50 of the row, printed to 3 decimals in the handler line and to 2 in the row
    assert 0 < handler_ms <= call_ms and abs(call_ms - float(row[1].split()[1])) <= 0.0051


def _spinners_left() -> list[int]:
    """Live processes whose command line carries bench.unary's spinner mark."""
    mark = bench_module("unary").SPINNER_MARK.encode()
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "cmdline").read_bytes():
                left.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return left


def test_the_unary_bench_keeps_every_cpu_busy_while_it_measures_and_no_longer():
    result = subprocess.run(
        [sys.executable, "-m", "bench.unary", "--seconds", "0.5", "--runs", "1",
         "--concurrency", "1", "--busy-cpus"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    cpus = len(os.sched_getaffinity(0))
    assert lines[0].endswith(f"; {cpus} CPUs kept busy by spinners at nice 19"), lines[0]
    row = lines[-1].split("|")
    assert row[0].strip() == "1" and float(row[1].split()[0]) > 0
    assert _spinners_left() == []  # killed with the bench's end


@pytest.mark.parametrize("loop_args", [(), ("--uvloop",)], ids=["asyncio", "uvloop"])
def test_the_echo_peer_answers_a_reserve_on_either_event_loop(loop_args: tuple[str, ...]):
    import grpc
    from quotad_contract.v1 import quotad_pb2 as pb
    from quotad_contract.v1 import quotad_pb2_grpc as stubs

    echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", *loop_args],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = stubs.QuotaServiceStub(channel).Reserve(
                pb.ReserveRequest(user_id="u", event_type="chat", amount=1), timeout=30)
        assert answer.allowed and answer.reservation_id.startswith("rsv_")
    finally:
        echo.kill()
        echo.wait(timeout=30)


def _run_bench(module: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def test_the_batch_bench_drives_quotad_and_reports_its_cpu_per_pair():
    lines = _run_bench("bench.batch", "--seconds", "0.5", "--runs", "1", "--processes", "1",
                       "--batch", "50", "--in-flight", "1", "--idempotency-keys")
    figures = {line.split()[0]: float(line.split()[1].replace(",", "")) for line in lines[1:]}
    assert figures["pairs_per_s"] > 0 and figures["errors"] == 0
    assert figures["server_us_per_pair"] > 0 and figures["records_per_txn"] >= 1


def test_the_batch_bench_starts_quotad_with_the_arguments_given_and_refuses_them_with_target():
    lines = _run_bench("bench.batch", "--seconds", "0.5", "--runs", "1", "--processes", "1",
                       "--batch", "50", "--in-flight", "1", "--quotad-arg=--commit-delay-ms=0")
    figures = {line.split()[0]: float(line.split()[1].replace(",", "")) for line in lines[1:]}
    assert figures["pairs_per_s"] > 0 and figures["errors"] == 0
    refused = subprocess.run(  # the server refuses the value: the bench fails with its words
        [sys.executable, "-m", "bench.batch", "--seconds", "0.5", "--runs", "1",
         "--quotad-arg=--admission-operations=0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0 and "admission-operations" in refused.stderr
    for flags in (("--target", "127.0.0.1:1", "--quotad-arg=--x"),
                  ("--echo", "--quotad-arg=--x"), ("--echo-arg=--uvloop",)):
        refused = subprocess.run([sys.executable, "-m", "bench.batch", *flags],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 2 and "is for the server the bench starts" in refused.stderr

def test_the_core_cost_bench_drives_the_real_core_and_log_and_prints_cpu_per_pair():
    lines = _run_bench("bench.core_cost", "--pairs", "20", "--rounds", "2", "--warmup-rounds", "1")
    assert lines[-1].split()[0] == "cpu_us_per_pair" and float(lines[-1].split()[1]) > 0
    names = ("parse", "convert", "apply", "fill", "encode", "append", "forget", "records")
    stages = {line.split()[0]: [float(n) for n in re.findall(r"[0-9.]+", line)]
              for line in lines if line.split()[:1] and line.split()[0] in names}
    assert list(stages) == list(names)  # the stages, then the append's records encoded alone
    assert all(len(figures) == 4 and figures[0] > 0 and figures[2] > 0
               for figures in (stages["append"], stages["records"]))
    refused = subprocess.run([sys.executable, "-m", "bench.core_cost", "--pairs", "0"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "--pairs must be 1 to 4096" in refused.stderr


def test_the_user_memory_bench_subscribes_users_live_and_prints_their_cost():
    lines = _run_bench("bench.user_memory", "--users", "10000")
    assert lines[0] == "10,000 users subscribed live, two counters each in use"
    figures = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert figures["bytes_per_user"] > 0 and figures["cpu_us_per_user"] > 0
    assert 0 <= figures["tracked_objects_per_user"] < 1  # none of a user's, once collected
    refused = subprocess.run([sys.executable, "-m", "bench.user_memory", "--users", "0"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "--users must be 1 to 5,000,000" in refused.stderr


def test_the_lmdb_inserts_bench_puts_rows_in_both_orders_and_prints_their_cost():
    lines = _run_bench("bench.lmdb_inserts", "--rows-before", "2000", "--transactions", "3",
                       "--rows-per-transaction", "50", "--runs", "1")
    rows = {line.split()[0]: line.split()[1:] for line in lines[-2:]}
    assert set(rows) == {"random", "growing"}
    assert all(float(cell) >= 0 for row in rows.values() for cell in row[::2])
    assert float(rows["random"][-2]) > 0  # KiB written per transaction
    refused = subprocess.run([sys.executable, "-m", "bench.lmdb_inserts", "--runs", "0"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "must be 1 or more" in refused.stderr


def test_the_server_loop_bench_times_a_wait_over_quotads_pending_requests_and_every_method():
    lines = _run_bench("bench.server_loop", "--rounds", "200", "--runs", "1")
    rows = {line[:32].strip(): line[32:].split() for line in lines[1:]}
    assert set(rows) == {"quotad (data path registered)", "every method registered",
                         "the echo peer (generic handler)"}
    assert int(rows["quotad (data path registered)"][0]) == 12  # 8 + health's 3 + the rest
    assert int(rows["every method registered"][0]) == 34  # 30 + health's 3 + the rest
    assert int(rows["the echo peer (generic handler)"][0]) == 1
    assert all(float(row[1]) > 0 for row in rows.values())
    refused = subprocess.run([sys.executable, "-m", "bench.server_loop", "--runs", "0"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "--runs" in refused.stderr


def test_the_fsync_and_stream_benches_run():
    lines = _run_bench("bench.fsync", "--commits", "20", "--records", "1,10")
    assert [line.split()[0] for line in lines[1:]] == ["1", "10"]
    assert all(float(line.split()[1]) > 0 for line in lines[1:])
    lines = _run_bench("bench.stream_vs_batch", "--seconds", "0.3", "--runs", "1",
                       "--window", "64", "--batch", "32", "--stream-batch", "8")
    rows = {line.split()[0]: line.split()[1:] for line in lines[-3:]}
    assert set(rows) == {"batch", "stream-1", "stream-N"}
    assert all(float(row[0].replace(",", "")) > 0 for row in rows.values())


def test_the_recovery_bench_restarts_from_its_snapshot_and_replays_the_whole_log(
        tmp_path: Path):
    args = ("--users", "40", "--tail-records", "30", "--runs", "1", "--dir", str(tmp_path))
    lines = _run_bench("bench.recovery", *args)
    assert lines[0].startswith("users 40 (2 counters each), log records 151, 30 after")
    assert [line.split()[0] for line in lines[1:]] == [
        "snapshot", "snapshot", "the", "snapshot", "commands", "snapshot", "commands",
        "snapshot", "the", "restart", "restart", "restart", "a", "full", "the"]
    assert lines[-5].startswith("restart (snapshot + a delta of the ")
    assert lines[-4].startswith("restart in a new process (snapshot + 30 records) ")
    assert ", 1 runs; CPU " in lines[-4] and lines[-4].split(", of it system ")[1].endswith(" s")
    # a server of its own on a copy, its serving line's digest checked against the live one's
    assert lines[-3].startswith("a server's own start (quotad serve on a copy), its recovery_s ")
    assert ", 1 runs); exec to listening before it " in lines[-3]
    assert lines[3].lstrip().startswith("the child's CPU ")
    assert "us per record at the server's cadence (a snapshot every 100,000 records)" in lines[3]
    assert lines[4].startswith("snapshot children of the restarted state, whole: CPU ")
    # the delta's users: every one of the 40 (the tail's 30 records and 20,000 Tracks)
    assert lines[6].startswith("snapshot children of the restarted state, deltas, of 40 users "
                               "changed: CPU ")
    for line in (lines[4], lines[6]):
        assert "1 runs): " in line and line.endswith(" us per record at the server's cadence")
    for line in (lines[5], lines[7]):
        assert line.lstrip().startswith("commands applied beside a child ")
        assert line.endswith("20,000 a run, the child at work throughout 0 of 1") or (
            line.endswith("20,000 a run, the child at work throughout 1 of 1"))
    assert "records/s" in lines[-2]
    assert lines[-1].lstrip().startswith("the records read back alone ")
    assert lines[-1].endswith(" us of CPU per record")
    again = _run_bench("bench.recovery", *args[:-2], "--replay-runs", "0", "--prune", "--dir",
                       str(tmp_path))  # the kept directory, measured again, then pruned
    assert again[1:4] == lines[1:4] and again[-3:-1] == lines[-2:]
    assert again[-1].startswith("pruning 121 records, 1,024 a transaction: ")
    assert "transactions: 1, median" in again[-1]
    smaller = _run_bench("bench.recovery", *args[:-2], "--replay-runs", "0", "--prune",
                         "--prune-transaction-records", "50", "--dir", str(tmp_path))
    assert smaller[-1].startswith("pruning 121 records, 50 a transaction: ")
    assert "transactions: 3, median" in smaller[-1]


def test_the_recovery_bench_replays_a_log_of_keyed_records_to_the_live_state(tmp_path: Path):
    """With --idempotency-keys every record holds its first answer: the restart and the full
    replay make each again and check it (the bench compares every recovered state's digest
    with the live one's, and fails otherwise)."""
    lines = _run_bench("bench.recovery", "--users", "20", "--tail-records", "20", "--runs", "1",
                       "--idempotency-keys", "--dir", str(tmp_path))
    assert lines[0].startswith("users 20 (2 counters each), log records 81, 20 after the "
                               "snapshot, each Reserve and Commit keyed; ")
    assert lines[-6].startswith("restart (snapshot + 20 records) ")
    assert lines[-4].startswith("restart in a new process (snapshot + 20 records) ")
    assert lines[-3].startswith("a server's own start (quotad serve on a copy), its recovery_s ")
    assert "records/s" in lines[-2] and "us of CPU per record" in lines[-1]


def test_the_recovery_bench_refuses_a_pruning_transaction_of_no_records():
    result = subprocess.run([sys.executable, "-m", "bench.recovery", "--prune",
                             "--prune-transaction-records", "0"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "--prune-transaction-records must be at least 1" in result.stderr


def test_the_recovery_bench_help_explains_every_flag():
    recovery = bench_module("recovery")
    for action in recovery.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings


def _run_json_bench(tmp_path: Path, module: str, *args: str) -> tuple[list[str], dict]:
    results = tmp_path / "results"
    lines = _run_bench(module, "--results", str(results), *args)
    document = json.loads((results / "results.json").read_text())
    assert document["finished"] is True and document["machine"]["nproc"] >= 1
    return lines, document


def test_the_soak_samples_the_server_and_fits_bytes_per_operation(tmp_path: Path):
    lines, document = _run_json_bench(
        tmp_path, "bench.soak", "--minutes", "0.1", "--sample-s", "1", "--users", "50",
        "--concurrency", "8", "--warmup-minutes", "0.01")
    samples = document["samples"]
    assert len(samples) >= 4
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert samples[-1]["ops"] > samples[0]["ops"] >= 0
    assert all(s["rss_anon_bytes"] > 0 and s["disk_allocated_bytes"] > 0 for s in samples)
    figures, run = document["figures"], document["run"]
    assert run["ops_per_s"] > 0 and run["errors"] == 0
    assert figures["rss_anon_bytes_per_op"] is not None
    assert figures["disk_allocated_bytes_per_op"] > 0 and figures["disk_apparent_bytes_per_op"] > 0
    assert figures["rss_growth_pct"] > -100
    assert {check["name"] for check in document["verdicts"]} == {"rss_growth_pct",
                                                                  "disk_bytes_per_op"}
    text = "\n".join(lines)
    for label in ("operations/s", "RSS per operation", "disk per operation", "RSS growth",
                  "log size bound"):
        assert label in text
    sized = figures["sizing"]  # the server's default bound: three quarters of its disk room
    assert sized["log_bytes_max"] == document["server"]["log_bytes_max"] > 0
    assert sized["bytes_per_day"] == pytest.approx(
        figures["ops_per_s_after_warmup"] * figures["disk_allocated_bytes_per_op"] * 86400)
    assert sized["keys_day_fits"] == (sized["days_kept"] >= 1)
    assert sum(line.startswith(("PASS ", "FAIL ")) for line in lines) == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results" / "soak.png").stat().st_size > 0


def test_the_soak_on_an_aged_log_prunes_its_records_as_they_pass_the_retention(tmp_path: Path):
    lines, document = _run_json_bench(
        tmp_path, "bench.soak", "--minutes", "0.15", "--sample-s", "1", "--users", "20",
        "--concurrency", "4", "--warmup-minutes", "0.01", "--aged-records", "6000",
        "--aged-minutes", "0.1", "--quotad-arg=--snapshot-every-records=2000")
    aged = document["aged"]
    assert aged["records"] in (5999, 6000)  # whole pairs after the 3,001 of the set-up
    assert aged["span_s"] == pytest.approx(6.0)
    assert 0 <= aged["waited_s"] <= 6000 * bench_module("soak").AGED_BUILD_NS_PER_RECORD / 1e9
    pruned = document["server"]["log_records_pruned"]  # the server's own stop line says it
    assert 0 < pruned <= aged["records"]
    assert document["run"]["errors"] == 0 and document["run"]["ops"] > 0
    assert any(line.startswith("aged log ") and f"pruned while serving: {pruned:,}" in line
               for line in lines)
    assert any(line.startswith("server CPU ") and "µs per operation" in line for line in lines)


def test_the_soak_refuses_an_aged_log_too_small_or_server_arguments_with_target():
    for args, said in ((["--aged-records", "3000"], "at least 3,001"),
                       (["--target", "127.0.0.1:1", "--pid", "1", "--data-dir", "d",
                         "--aged-records", "5000"], "not with --target"),
                       (["--target", "127.0.0.1:1", "--pid", "1", "--data-dir", "d",
                         "--quotad-arg=--log-level=debug"], "not with --target")):
        result = subprocess.run([sys.executable, "-m", "bench.soak", *args],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 2 and said in result.stderr, (args, result.stderr)


def test_the_soak_needs_the_pid_and_data_dir_of_a_server_it_did_not_start():
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--target", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "--pid" in result.stderr


def test_the_overload_bench_measures_goodput_against_capacity_for_quotad_and_echo(
        tmp_path: Path):
    lines, document = _run_json_bench(
        tmp_path, "bench.overload", "--processes", "2", "--concurrency", "50",
        "--calibration-concurrency", "8", "--seconds", "2", "--runs", "1", "--users", "50")
    assert set(document["targets"]) == {"quotad", "echo"}
    for name, entry in document["targets"].items():
        median = entry["median"]
        assert median["capacity_pairs_per_s"] > 0, name
        assert median["goodput_pairs_per_s"] >= 0 and median["goodput_share"] >= 0, name
        assert median["survived_runs"] == 1 and median["peak_rss_bytes"] > 0, name
        assert median["overload_codes"]["OK"] > 0, name
        run = entry["runs"][0]
        assert set(run["overload"]["codes"]) >= {"OK", "CANCELLED", "DEADLINE_EXCEEDED",
                                                 "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
        assert run["calibration"]["in_flight"] == 16 and run["overload"]["in_flight"] == 100
        for phase in ("calibration", "overload"):  # where the machine's CPU went
            assert run[phase]["attempts_per_s"] > 0, (name, phase)
            assert run[phase]["client_cpu_per_attempt_us"] > 0, (name, phase)
            if Path("/proc/self/schedstat").exists():  # the server's loop: ran, maybe waited
                assert 0 < run[phase]["loop_on_cpu_share"] <= 1.05, (name, phase)
                assert 0 <= run[phase]["loop_waiting_share"] <= 1.05, (name, phase)
                assert run[phase]["server_waiting_cpus"] >= run[phase]["loop_waiting_share"]
        assert median["calibration_server_cpu_per_good_pair_us"] > 0, name
    text = "\n".join(lines)
    assert "quotad / echo, goodput as a share of capacity:" in text
    assert any(line.startswith("quotad ") and "%" in line for line in lines)
    assert any(line.strip().startswith("DEADLINE_EXCEEDED") for line in lines)
    assert any(line.startswith("quotad  overload") and "µs" in line for line in lines)
    assert any(line.startswith("(the server's event loop thread") for line in lines)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to separate")
def test_the_overload_bench_can_keep_the_server_on_a_cpu_of_its_own(tmp_path: Path):
    lines, document = _run_json_bench(
        tmp_path, "bench.overload", "--targets", "echo", "--separate-cpus", "--processes", "1",
        "--concurrency", "20", "--calibration-concurrency", "4", "--seconds", "1",
        "--runs", "1", "--users", "10")
    cpus = sorted(os.sched_getaffinity(0))
    assert f"servers on CPU {cpus[-1]}, clients on " in lines[0]
    assert document["config"]["separate_cpus"] is True
    assert document["targets"]["echo"]["median"]["survived_runs"] == 1


def test_the_soak_and_overload_help_explain_every_flag():
    overload = bench_module("overload")
    soak = bench_module("soak")
    for module in (soak, overload):
        flags = [action for action in module.build_parser()._actions if action.option_strings]
        for action in flags:
            assert action.help and len(action.help) > 15, action.option_strings
