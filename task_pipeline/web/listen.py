"""The address `serve --http` listens on: `host:port`, `[v6]:port`, or a unix socket path.

Pure: parsing and the loopback decision, which says whether a token is required (anything that
may be reached from another machine needs one). A name other than `localhost` counts as
reachable from elsewhere: what it resolves to may change after start-up.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from task_pipeline.errors import UsageError
from task_pipeline.textsafe import one_line

EXAMPLE = "127.0.0.1:8080, [::1]:8080, or a unix socket path such as /run/task-pipeline/http.sock"


@dataclass(frozen=True)
class Listen:
    host: str | None = None    # None: a unix socket
    port: int | None = None
    path: str | None = None    # the unix socket

    @property
    def loopback(self) -> bool:
        """Reachable only from this machine (a unix socket is guarded by its file permissions)."""
        if self.path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def url(self) -> str:
        if self.path is not None:
            return f"http+unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def hosts(self) -> list[str] | None:
        """The Host headers a loopback listener answers (a page of another site that renamed itself
        to 127.0.0.1, DNS rebinding, gets nothing); None: any."""
        if self.path is not None or not self.loopback:
            return None
        names = {"localhost", "127.0.0.1", "[::1]", f"[{self.host}]" if ":" in (self.host or "") else self.host}
        return sorted(f"{n}:{self.port}" for n in names) + (sorted(names) if self.port == 80 else [])


def parse(text: str) -> Listen:
    shown = one_line(text)
    value = text[5:] if text.startswith("unix:") else text
    if "/" in value:
        return Listen(path=value)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise UsageError(f"--http {shown}: an IPv6 address takes its port after the bracket, as [::1]:8080")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"--http {shown}: '{one_line(host)}' is not an IPv6 address; give e.g. [::1]:8080") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise UsageError(f"--http {shown}: give HOST:PORT or a socket path ({EXAMPLE})")
        if ":" in host:
            raise UsageError(f"--http {shown}: put an IPv6 address in brackets, as [::1]:8080")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--http {shown}: the port must be a number from 1 to 65535 ({EXAMPLE})")
    return Listen(host=host, port=int(port))


def check(listen: Listen, has_token: bool, flag: str) -> None:
    """Listening where other machines can connect needs a token for the actions."""
    if not listen.loopback and not has_token:
        raise UsageError(f"--http {flag}: other machines could reach it and change the store; give "
                         f"--http-token-file FILE (actions then need its token), or listen on 127.0.0.1")
