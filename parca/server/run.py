"""Running the app: bind (127.0.0.1 unless told otherwise), ``serve`` (blocking), ``ServerThread``."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from ..engine import Engine
from ..errors import ParcaError
from .app import create_app


# ---- running it -------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> Any:
    import socket

    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ParcaError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """Run an app with uvicorn in a background thread on ``host:port`` (port 0 = any free port).

        with ServerThread(create_app(engine, "m")) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="-")...
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.app = app
        self.sock = _bind(host, port)
        self.url = _url(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="parca-http")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise ParcaError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        runner = getattr(getattr(self.app, "state", None), "runner", None)
        if runner is not None:
            runner.drain()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          default_attention: str | None = None, aliases: Sequence[str] = (), log_level: str = "info",
          print_fn: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C (SIGINT/SIGTERM: uvicorn stops accepting, in-flight requests get 5 s, then the engine
    thread stops and their slots are freed)."""
    import uvicorn

    app = create_app(engine, model_name, api_key, default_attention=default_attention, aliases=aliases)
    sock = _bind(host, port)
    url = _url(sock)
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGINT / SIGTERM
            app.state.runner.drain()  # end in-flight generations now, so connections close and shutdown is quick
            super().handle_exit(sig, frame)

    server = _Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))
    print_fn(f"parca: serving '{model_name}' at {url}/v1 (default attention {app.state.default_attention}, "
             f"max model len {app.state.max_model_len}, {engine.max_slots} slots"
             f"{', API key required' if api_key else ''}); Ctrl-C to stop")
    if not api_key and not _is_loopback(host):
        print_fn(f"parca: warning: listening on {host} without an API key: anyone who can reach this port can use "
                 f"the model (set --api-key)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down: that is the stop
        pass
    finally:
        sock.close()
    print_fn("parca: server stopped")
