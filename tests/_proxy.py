"""A loopback TCP proxy the tests put between a client and a real server (PostgreSQL, RabbitMQ) to do to a
live connection what a network does: cut it (a broker restart, a load balancer's idle timeout) or hold it
silent (a hung PgBouncer or cloud SQL proxy: sockets open, the kernel still ACKs, nothing relayed)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

__all__ = ["TcpProxy"]


class TcpProxy:
    """Relays 127.0.0.1:``port`` to ``target``; ``accepted`` counts the connections it took."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = threading.Event()  # set: data is held, never relayed, never answered
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the server is down: this client is refused, the next one tried again
                client.close()
                continue
            self.accepted += 1
            self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.silent.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Shut every open connection down (both ways); new ones are still accepted."""
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def close(self) -> None:
        self.silent.clear()
        self.cut()
        self.listener.close()
