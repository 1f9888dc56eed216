"""The contract shared by the quotad server and its clients: the generated gRPC stubs
(`quotad_contract.v1`), the wire limits, the user-token format and the error reasons.

It imports nothing of the server and sets nothing process-wide; importing it does not
import grpc (only `quotad_contract.v1.quotad_pb2_grpc` does).
"""
