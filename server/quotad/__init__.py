"""quotad: a per-end-user quota authority for AI products."""

import os

# Snapshots are written by a forked child process (snapshot_child.py) that never uses gRPC.
# gRPC's own fork handlers would restart its threads in that child, polling descriptors the
# parent still serves on; they are turned off before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
