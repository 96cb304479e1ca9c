#!/usr/bin/env python3
"""A tiny istio-cni stand-in for in-pod mode on one machine (scripts/inpod-demo.sh runs it).

istio-cni hands a node proxy the pods of its node over a Unix SOCK_SEQPACKET socket: the ZDS
protocol (package istio.workload.zds; CONTROL-PLANE.md, "In-pod mode"). This script listens on
--socket and, for each connection of the proxy:

  1. reads the proxy's ZdsHello (version 1);
  2. sends one AddWorkload per --pod, with the pod's network namespace as a file descriptor
     (SCM_RIGHTS), and reads the proxy's Ack after each;
  3. sends SnapshotSent and reads its Ack;
  4. waits for the connection to close, then accepts the next one (a restarted proxy dials again).

The protobuf messages are written and read by hand (no pip package): one message per datagram, no
length prefix, at most 1024 bytes. Every message is a length-delimited field (wire type 2):

  WorkloadRequest { AddWorkload add = 1; DelWorkload del = 2; SnapshotSent snapshot_sent = 3;
                    KeepWorkload keep = 5; }
  AddWorkload     { string uid = 1; WorkloadInfo workload_info = 2; }
  WorkloadInfo    { string name = 1; string namespace = 2; string service_account = 3; }
  WorkloadResponse { Ack ack = 1; }     Ack { string error = 1; }     (empty error: ACK, "0a 00")
  ZdsHello        { Version version = 1; }  (a varint: "08 01" is V1)

Usage: inpod-istio-cni.py --socket PATH --pod UID=NETNS_PATH,NAME,NAMESPACE,SERVICE_ACCOUNT [--pod ...]
"""

import argparse
import os
import socket
import sys


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, payload):
    """A length-delimited field (wire type 2): tag, length, bytes."""
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def add_workload(uid, name, namespace, service_account):
    info = field(1, name) + field(2, namespace) + field(3, service_account)
    return field(1, field(1, uid) + field(2, info))


def snapshot_sent():
    return field(3, b"")


def fields(data):
    """The fields of a protobuf message: a list of (number, wire type, value)."""
    out, i = [], 0

    def read_varint():
        nonlocal i
        value, shift = 0, 0
        while True:
            if i >= len(data):
                raise ValueError("truncated varint")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = read_varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, read_varint()))
        elif wire == 2:
            length = read_varint()
            out.append((number, wire, data[i : i + length]))
            i += length
        else:
            raise ValueError("unexpected wire type %d" % wire)
    return out


def ack_error(data):
    """The error of a WorkloadResponse's Ack ("" for an ACK)."""
    for number, wire, value in fields(data):
        if number == 1 and wire == 2:
            for n, w, v in fields(value):
                if n == 1 and w == 2:
                    return v.decode(errors="replace")
            return ""
    raise ValueError("not an Ack: %s" % data.hex(" "))


def log(message):
    print("istio-cni: " + message, flush=True)


def serve(conn, pods):
    hello = conn.recv(1024)
    version = [v for n, w, v in fields(hello) if n == 1 and w == 0]
    log("the proxy said hello (ZdsHello version %s)" % (version[0] if version else "?"))
    for uid, netns, name, namespace, service_account in pods:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            socket.send_fds(conn, [add_workload(uid, name, namespace, service_account)], [fd])
        finally:
            os.close(fd)
        answer = conn.recv(1024)
        if not answer:
            log("the proxy closed the connection")
            return
        error = ack_error(answer)
        log("AddWorkload %s (%s/%s, %s): %s" % (uid, namespace, name, netns, "ACK" if not error else "NACK: " + error))
    conn.send(snapshot_sent())
    answer = conn.recv(1024)
    if answer:
        error = ack_error(answer)
        log("SnapshotSent: %s" % ("ACK" if not error else "NACK: " + error))
    # The session stays open until the proxy leaves.
    while conn.recv(1024):
        pass
    log("the proxy closed the connection")


def main():
    parser = argparse.ArgumentParser(description="A tiny istio-cni stand-in (ZDS over SOCK_SEQPACKET).")
    parser.add_argument("--socket", required=True, help="the socket path the proxy dials (INPOD_UDS)")
    parser.add_argument(
        "--pod",
        action="append",
        default=[],
        metavar="UID=NETNS_PATH,NAME,NAMESPACE,SERVICE_ACCOUNT",
        help="a pod to hand over, e.g. uid-a=/run/netns/pod-a,a,default,a",
    )
    args = parser.parse_args()
    pods = []
    for spec in args.pod:
        uid, _, rest = spec.partition("=")
        parts = rest.split(",")
        if not uid or len(parts) != 4:
            parser.error("--pod %r: expected UID=NETNS_PATH,NAME,NAMESPACE,SERVICE_ACCOUNT" % spec)
        pods.append((uid, *parts))
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(args.socket)
    listener.listen(4)
    log("listening on %s" % args.socket)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve(conn, pods)
            except (OSError, ValueError) as e:
                log("session ended: %s" % e)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
