"""Generated gRPC stubs for the proto package quotad.v1 (written by the build from protos/; never
edit)."""
