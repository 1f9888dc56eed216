"""Generated gRPC stubs for quotad.v1 (written by the build from protos/; never edit)."""
