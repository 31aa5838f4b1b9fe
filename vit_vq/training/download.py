"""Bounded network access for weight and dataset downloads.

A firewalled machine must fail fast, not hang: `probe` opens one TCP connection to the host
(or to the configured proxy) in a daemon thread and gives up after `timeout` seconds, which
also bounds a DNS lookup that never answers; `socket_timeout` bounds every later connect and
read of urllib, so a stalled transfer fails instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator


def probe(url: str, timeout: float) -> None:
    """Check within `timeout` seconds that `url`'s host (or its proxy) accepts a TCP connection.

    Raises:
        OSError: the host cannot be resolved or reached. TimeoutError: no answer in time.
    """
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    error: list[OSError] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            error.append(err)

    thread = threading.Thread(target=connect, daemon=True, name="vit-vq-probe")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{host}:{port} did not answer within {timeout:g} s")
    if error:
        raise OSError(f"cannot reach {host}:{port}: {type(error[0]).__name__}: {error[0]}")


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the process-wide default socket timeout for the duration of the block."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


__all__ = ["probe", "socket_timeout"]
