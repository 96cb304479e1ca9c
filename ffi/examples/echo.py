#!/usr/bin/env python3
"""libmeshwire from Python with ctypes: an HBONE server that echoes, and a client that dials it.

Both sides get their identities from meshwire's local CA in CA_DIR (created if empty). The server
hands each accepted tunnel to a thread that echoes it; the client dials through HBONE, sends a
message, half-closes, and reads the echo back. Exits 0 and prints "echo: ok" when the bytes match.

Usage: python3 echo.py LIBMESHWIRE CA_DIR
       (LIBMESHWIRE: the path of libmeshwire.so, for example target/debug/libmeshwire.so)
"""

import ctypes
import socket
import sys
import threading

SERVER_ID = b"spiffe://cluster.local/ns/demo/sa/python-server"
CLIENT_ID = b"spiffe://cluster.local/ns/demo/sa/python-client"

# int (*)(void *user_data, const char *peer_identity, const char *authority, int fd)
ACCEPT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int)


class Header(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class MeshwireError(Exception):
    pass


def load(path):
    lib = ctypes.CDLL(path)
    lib.meshwire_version.restype = ctypes.c_char_p
    lib.meshwire_last_error.restype = ctypes.c_char_p
    lib.meshwire_status_name.restype = ctypes.c_char_p
    lib.meshwire_status_name.argtypes = [ctypes.c_int]
    lib.meshwire_context_new_local_ca.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.meshwire_context_free.argtypes = [ctypes.c_void_p]
    lib.meshwire_context_free.restype = None
    lib.meshwire_server_start.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ACCEPT_CALLBACK, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.meshwire_server_port.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint16)]
    lib.meshwire_server_free.argtypes = [ctypes.c_void_p]
    lib.meshwire_server_free.restype = None
    lib.meshwire_dial.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
        ctypes.POINTER(Header), ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int)]
    for name in ("meshwire_context_new_local_ca", "meshwire_server_start", "meshwire_server_port", "meshwire_dial"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def check(lib, status, what):
    if status != 0:
        name = lib.meshwire_status_name(status).decode()
        raise MeshwireError(f"{what}: {name}: {lib.meshwire_last_error().decode()}")


def echo(sock):
    with sock:
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    lib = load(sys.argv[1])
    ca_dir = sys.argv[2].encode()
    print("libmeshwire", lib.meshwire_version().decode())

    server_ctx, client_ctx, server = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    check(lib, lib.meshwire_context_new_local_ca(ca_dir, SERVER_ID, ctypes.byref(server_ctx)), "server context")
    check(lib, lib.meshwire_context_new_local_ca(ca_dir, CLIENT_ID, ctypes.byref(client_ctx)), "client context")

    peers, echoes = [], []

    def on_accept(_user_data, peer, authority, fd):
        # Runs on a meshwire thread; the fd is ours once we return 0.
        peers.append((peer.decode(), authority.decode()))
        thread = threading.Thread(target=echo, args=(socket.socket(fileno=fd),))
        thread.start()
        echoes.append(thread)
        return 0

    callback = ACCEPT_CALLBACK(on_accept)  # must outlive the server
    check(lib, lib.meshwire_server_start(server_ctx, b"127.0.0.1:0", callback, None, ctypes.byref(server)),
          "server")
    port = ctypes.c_uint16()
    check(lib, lib.meshwire_server_port(server, ctypes.byref(port)), "server port")

    expected = (ctypes.c_char_p * 1)(SERVER_ID)
    metadata = (Header * 1)(Header(b"baggage", b"k8s.namespace.name=demo,service.name=python"))
    fd = ctypes.c_int(-1)
    check(lib, lib.meshwire_dial(client_ctx, f"127.0.0.1:{port.value}".encode(), b"echo.demo.svc.cluster.local:7",
                                 expected, 1, metadata, 1, ctypes.byref(fd)), "dial")
    message = b"hello through HBONE from python\n" * 1000
    with socket.socket(fileno=fd.value) as tunnel:
        tunnel.sendall(message)
        tunnel.shutdown(socket.SHUT_WR)
        received = b""
        while data := tunnel.recv(65536):
            received += data

    lib.meshwire_server_free(server)
    for thread in echoes:
        thread.join()
    lib.meshwire_context_free(client_ctx)
    lib.meshwire_context_free(server_ctx)

    if received != message:
        sys.exit(f"echo: {len(received)} bytes came back, {len(message)} were sent, or they differ")
    if peers != [(CLIENT_ID.decode(), "echo.demo.svc.cluster.local:7")]:
        sys.exit(f"echo: the server saw {peers}")
    print(f"echo: ok, {len(message)} bytes through HBONE, client identity {peers[0][0]}")


if __name__ == "__main__":
    main()
