#!/usr/bin/env python3
"""The driver's CSI sockets as gRPC's C core sees them (Python `grpcio`).

Calls every service the driver serves on its unix sockets (Identity, Controller, GroupController,
SnapshotMetadata on the controller's; Identity and Node on each node plugin's) with three
channels per socket: `unix:///path` and `unix:/path` with grpcio's default options (grpcio 1.57
and later then send the socket path, escaped, as the HTTP/2 `:authority`, which the driver's
relay repairs: grpc/authority.rs), and `unix:///path` with `grpc.default_authority=localhost`
(the option a client can set against any tonic server). Asserts on the answers, prints one line
per call and the counts, and exits non-zero on any failure.

Needs grpcio and stubs generated from csi-driver/proto/proto/csi.proto (hack/grpc-clients.sh
makes both): --stubs DIR holds csi_pb2.py and csi_pb2_grpc.py.

  csi_clients.py --stubs DIR --controller SOCK [--snapshot-metadata] \\
      --node SOCK[=NODE_ID] [--node ...] [--no-cluster]

--no-cluster: the driver runs without an API server it can reach (ListVolumes is not called).
"""

import argparse
import os
import re
import subprocess
import sys

DRIVER_NAME = "csi.livedisk.io"
TOPOLOGY_KEY = "topology.livedisk.io/node"
TIMEOUT = 30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stubs", required=True, help="directory with csi_pb2.py and csi_pb2_grpc.py")
    p.add_argument("--controller", required=True, help="the controller's socket path")
    p.add_argument("--node", action="append", default=[], help="a node plugin's socket path[=node id]")
    p.add_argument("--snapshot-metadata", action="store_true",
                   help="the controller serves SnapshotMetadata (it advertises it)")
    p.add_argument("--no-cluster", action="store_true", help="no API server: ListVolumes not called")
    p.add_argument("--observe-authority", metavar="SOCK", help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = parse_args()
sys.path.insert(0, ARGS.stubs)
import grpc  # noqa: E402
import csi_pb2 as pb  # noqa: E402
import csi_pb2_grpc as rpc  # noqa: E402


def channels(path):
    """(label, target, options) of the channels each socket is called through."""
    return [
        ("unix:///path, default options", "unix://" + path, []),
        ("unix:/path, default options", "unix:" + path, []),
        ("unix:///path, grpc.default_authority=localhost", "unix://" + path,
         [("grpc.default_authority", "localhost")]),
    ]


class Run:
    def __init__(self):
        self.passed = 0
        self.failed = []
        self.channel = ""

    def check(self, what, call, verify):
        """Runs `call`, hands its answer (or its RpcError) to `verify`, which raises on a wrong one."""
        try:
            try:
                answer = call()
            except grpc.RpcError as error:
                answer = error
            verify(answer)
        except Exception as failure:  # noqa: BLE001: every failure is reported, none stops the run
            self.failed.append(f"{self.channel}: {what}: {failure}")
            print(f"  FAIL {what}: {failure}", flush=True)
            return
        self.passed += 1
        print(f"  ok   {what}", flush=True)


def ok(answer):
    if isinstance(answer, grpc.RpcError):
        raise AssertionError(f"{answer.code()}: {answer.details()}")
    return answer


def code(expected):
    def verify(answer):
        if not isinstance(answer, grpc.RpcError):
            raise AssertionError(f"answered {type(answer).__name__}, expected {expected}")
        if answer.code() != expected:
            raise AssertionError(f"{answer.code()} ({answer.details()}), expected {expected}")
    return verify


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def services(answer):
    return {c.service.type for c in ok(answer).capabilities if c.HasField("service")}


def plugin_info(answer):
    info = ok(answer)
    expect(info.name == DRIVER_NAME, f"name {info.name!r}")
    expect(info.vendor_version, "no vendor_version")


def identity(run, channel, controller):
    stub = rpc.IdentityStub(channel)
    run.check("Identity.GetPluginInfo",
              lambda: stub.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=TIMEOUT), plugin_info)
    Service = pb.PluginCapability.Service

    def capabilities(answer):
        got = services(answer)
        expect(Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in got, f"no topology in {got}")
        if controller:
            expect(Service.CONTROLLER_SERVICE in got, f"no CONTROLLER_SERVICE in {got}")
            expect(Service.GROUP_CONTROLLER_SERVICE in got, f"no GROUP_CONTROLLER_SERVICE in {got}")
            expect((Service.SNAPSHOT_METADATA_SERVICE in got) == ARGS.snapshot_metadata,
                   f"SNAPSHOT_METADATA_SERVICE advertised: {Service.SNAPSHOT_METADATA_SERVICE in got}")
        else:
            expect(Service.CONTROLLER_SERVICE not in got, "a node plugin advertises the controller")
    run.check("Identity.GetPluginCapabilities",
              lambda: stub.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=TIMEOUT),
              capabilities)

    def probe(answer):
        expect(ok(answer).ready.value, "not ready")
    run.check("Identity.Probe", lambda: stub.Probe(pb.ProbeRequest(), timeout=TIMEOUT), probe)


def controller(run, channel):
    stub = rpc.ControllerStub(channel)
    Rpc = pb.ControllerServiceCapability.RPC

    def capabilities(answer):
        got = {c.rpc.type for c in ok(answer).capabilities}
        for want in (Rpc.CREATE_DELETE_VOLUME, Rpc.LIST_VOLUMES, Rpc.CREATE_DELETE_SNAPSHOT):
            expect(want in got, f"{Rpc.Type.Name(want)} not in {sorted(got)}")
    run.check("Controller.ControllerGetCapabilities",
              lambda: stub.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(),
                                                     timeout=TIMEOUT), capabilities)
    if not ARGS.no_cluster:
        def listed(answer):
            answer = ok(answer)
            for entry in answer.entries:
                expect(entry.volume.volume_id, "an entry without a volume_id")
        run.check("Controller.ListVolumes",
                  lambda: stub.ListVolumes(pb.ListVolumesRequest(max_entries=5), timeout=TIMEOUT), listed)
        run.check("Controller.ListVolumes, a token that is not one -> ABORTED",
                  lambda: stub.ListVolumes(pb.ListVolumesRequest(starting_token="\x01not-a-token"),
                                           timeout=TIMEOUT),
                  code(grpc.StatusCode.ABORTED))
    run.check("Controller.CreateVolume without a name -> INVALID_ARGUMENT",
              lambda: stub.CreateVolume(pb.CreateVolumeRequest(name=""), timeout=TIMEOUT),
              code(grpc.StatusCode.INVALID_ARGUMENT))

    group = rpc.GroupControllerStub(channel)
    GroupRpc = pb.GroupControllerServiceCapability.RPC

    def group_capabilities(answer):
        got = {c.rpc.type for c in ok(answer).capabilities}
        expect(GroupRpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT in got, f"got {sorted(got)}")
    run.check("GroupController.GroupControllerGetCapabilities",
              lambda: group.GroupControllerGetCapabilities(
                  pb.GroupControllerGetCapabilitiesRequest(), timeout=TIMEOUT), group_capabilities)

    metadata = rpc.SnapshotMetadataStub(channel)
    # A server-streaming call: the error comes as the stream's status.
    expected = grpc.StatusCode.INVALID_ARGUMENT if ARGS.snapshot_metadata else grpc.StatusCode.UNIMPLEMENTED
    run.check(f"SnapshotMetadata.GetMetadataAllocated without a snapshot -> {expected.name}",
              lambda: list(metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(), timeout=TIMEOUT)),
              code(expected))


def node(run, channel, node_id):
    stub = rpc.NodeStub(channel)

    def info(answer):
        answer = ok(answer)
        expect(answer.node_id, "no node_id")
        if node_id:
            expect(answer.node_id == node_id, f"node_id {answer.node_id!r}, expected {node_id!r}")
        segments = answer.accessible_topology.segments
        expect(segments.get(TOPOLOGY_KEY) == answer.node_id, f"topology {dict(segments)}")
    run.check("Node.NodeGetInfo", lambda: stub.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=TIMEOUT), info)
    Rpc = pb.NodeServiceCapability.RPC

    def capabilities(answer):
        got = {c.rpc.type for c in ok(answer).capabilities}
        expect(Rpc.STAGE_UNSTAGE_VOLUME in got, f"no STAGE_UNSTAGE_VOLUME in {sorted(got)}")
    run.check("Node.NodeGetCapabilities",
              lambda: stub.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=TIMEOUT),
              capabilities)
    run.check("Node.NodeStageVolume without a staging path -> INVALID_ARGUMENT",
              lambda: stub.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id="vol-none"), timeout=TIMEOUT),
              code(grpc.StatusCode.INVALID_ARGUMENT))


def observed_authority(path, target):
    """The `:authority` grpcio sends for `target`, read from its own HTTP trace (a child process:
    the trace is set from the environment at import). None when the trace does not show it."""
    env = dict(os.environ, GRPC_TRACE="http", GRPC_VERBOSITY="debug")
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--stubs", ARGS.stubs, "--controller", path,
         "--observe-authority", target],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r":authority: ([^,}\s]+)", child.stderr)
    return found.group(1) if found else None


def main():
    if ARGS.observe_authority:
        channel = grpc.insecure_channel(ARGS.observe_authority)
        try:
            rpc.IdentityStub(channel).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=TIMEOUT)
        except grpc.RpcError:
            pass
        return 0
    print(f"grpcio {grpc.__version__}, Python {sys.version.split()[0]}", flush=True)
    for target in ("unix://" + ARGS.controller, "unix:" + ARGS.controller):
        authority = observed_authority(ARGS.controller, target)
        # What h2 takes as an authority has neither '%' nor '/' (http::uri::Authority).
        verdict = ("h2 refuses it as it is: the driver's relay repairs it"
                   if authority and re.search(r"[%/]", authority) else "an authority h2 accepts as it is")
        print(f"grpcio's default :authority for {target}: {authority or '(not in its trace)'} ({verdict})",
              flush=True)
    run = Run()
    sockets = [(ARGS.controller, None, True)]
    for spec in ARGS.node:
        path, _, node_id = spec.partition("=")
        sockets.append((path, node_id or None, False))
    for path, node_id, is_controller in sockets:
        for label, target, options in channels(path):
            run.channel = f"{'controller' if is_controller else 'node'} {path}, {label}"
            print(f"== {run.channel}", flush=True)
            with grpc.insecure_channel(target, options=options) as channel:
                identity(run, channel, is_controller)
                if is_controller:
                    controller(run, channel)
                else:
                    node(run, channel, node_id)
    total = run.passed + len(run.failed)
    print(f"grpcio {grpc.__version__} against the driver's sockets: {total} calls, "
          f"{run.passed} passed, {len(run.failed)} failed "
          f"({len(sockets)} sockets x 3 channels)", flush=True)
    for failure in run.failed:
        print(f"  failed: {failure}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
