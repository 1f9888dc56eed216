"""The server's dependencies (pyproject.toml has the rest of its metadata).

The server depends on the client distribution, quotad-client, built from this checkout's
client/: its contract, its token format and quotactl. A direct reference takes no relative
path, so it is written here with the absolute one, and `pip install -e .` (or `pip install .`)
installs both from one command.
"""

from pathlib import Path

from setuptools import setup

CLIENT = Path(__file__).resolve().parent / "client"

setup(install_requires=[
    f"quotad-client @ {CLIENT.as_uri()}",
    "grpcio==1.85.3",
    "grpcio-tools==1.85.1",
    "grpcio-status==1.85.3",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "googleapis-common-protos>=1.63",
    "protobuf>=6.31",
    "sortedcontainers>=2.4",
    "msgspec>=0.18",
    "lmdb>=3.0",  # keeps the GIL through a put, as the writer's split of batches was measured
    "prometheus-client>=0.20",
    "tzdata>=2024.1",
    "h11>=0.14",
    # the server's event loop (quotad.cli.run_server says why); none for Windows, where
    # asyncio's own runs instead
    "uvloop>=0.19; sys_platform != 'win32'",
])
