"""Probe a controller with off-the-shelf gRPC tooling (not ours): the standard
health service and server reflection, through grpcio's own helpers.

Usage: grpc_probe.py HOST:PORT [CA.pem]   — prints one line per finding; exit 0.
With CA.pem the channel is TLS (server verified against that CA, no client
certificate: health and reflection need no credentials)."""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

target = sys.argv[1]
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(target, credentials)
else:
    channel = grpc.insecure_channel(target)
with channel:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "federation.v1.FederationClient", "federation.v1.RegionAgentApi"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        name = service or "<server>"
        print(f"health {name} {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        print("health no.such.Service unexpectedly answered")
    except grpc.RpcError as e:
        print(f"health no.such.Service {e.code().name}")
    db = ProtoReflectionDescriptorDatabase(channel)
    for service in sorted(db.get_services()):
        print(f"reflection service {service}")
    desc = db.FindFileContainingSymbol("federation.v1.SubmitTaskRequest")
    print(f"reflection file {desc.name}")
