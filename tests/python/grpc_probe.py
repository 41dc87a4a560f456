"""Probe a controller with off-the-shelf gRPC tooling (not ours): the standard
health service and server reflection, through grpcio's own helpers.

Usage: grpc_probe.py HOST:PORT [CA.pem | --health-only]
Prints one line per finding; exit 0.
With CA.pem the channel is TLS (server verified against that CA, no client
certificate: health and reflection need no credentials). With --health-only
the channel is plaintext (as a Kubernetes gRPC probe's) and only the overall
health and the absence of everything else are checked."""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

target = sys.argv[1]
if sys.argv[2:] == ["--health-only"]:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        print(f"health <server> {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        try:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
            print("reflection unexpectedly answered")
        except grpc.RpcError as e:
            print(f"reflection {e.code().name}")
    sys.exit(0)
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
