"""Who may change the store through the web, and how browsers are kept from being tricked into it.

- The JSON API's actions (POST) need `Authorization: Bearer TOKEN` when serve was given
  --http-token-file: 401 without one, 403 with a wrong one.
- Browser forms use the synchronizer token pattern (OWASP's CSRF prevention): every page sets a
  session cookie (HttpOnly, SameSite=Strict) and puts a CSRF token derived from it (an HMAC under a
  key made at start-up) in its forms; a form post needs both to match, and its Origin, when the
  browser sends one, must be this server. With a token file, a browser signs in once by pasting
  the token; the session cookie then records that, signed.
- API posts without a token file are still kept from other sites: they must carry JSON (or the
  bytes of a file), content types a page of another site cannot send without asking first, and
  come from no other Origin.
- A loopback listener answers only Host headers naming this machine: a site that renames itself
  to 127.0.0.1 (DNS rebinding) gets 421.

HMACs and comparisons are pure (the caller reads requests and writes cookies); `read_token` reads
the token file at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

COOKIE = "tp_session"
# CORS-safelisted types: a page of any site may post these without a preflight, so they never act
SIMPLE_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
MIN_TOKEN = 16


@dataclass(frozen=True)
class Session:
    sid: str
    signed_in: bool


class Guard:
    def __init__(self, token: str | None, hosts: list[str] | None) -> None:
        self.token = token
        self.hosts = None if hosts is None else frozenset(h.lower() for h in hosts)
        self._key = os.urandom(32)

    @property
    def token_required(self) -> bool:
        return self.token is not None

    # -- sessions and CSRF tokens ---------------------------------------------------------

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, "|".join(parts).encode(), hashlib.sha256).hexdigest()

    def new_session(self, signed_in: bool = False) -> tuple[Session, str]:
        """A new session and its cookie value."""
        s = Session(os.urandom(16).hex(), signed_in)
        return s, self.cookie_value(s)

    def cookie_value(self, s: Session) -> str:
        flag = "1" if s.signed_in else "0"
        return f"{s.sid}.{flag}.{self._mac('session', s.sid, flag)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie names, if we issued it."""
        if not cookie or cookie.count(".") != 2:
            return None
        sid, flag, mac = cookie.split(".")
        if flag not in ("0", "1") or not hmac.compare_digest(mac, self._mac("session", sid, flag)):
            return None
        return Session(sid, flag == "1")

    def csrf(self, s: Session) -> str:
        return self._mac("csrf", s.sid)

    def csrf_ok(self, s: Session | None, sent: str | None) -> bool:
        return s is not None and bool(sent) and hmac.compare_digest(self.csrf(s), sent)

    def may_act(self, s: Session | None) -> bool:
        """A browser session may use the action forms: signed in, or no token is needed."""
        return s is not None and (s.signed_in or self.token is None)

    def sign(self, text: str) -> str:
        """For a message a redirect carries to the next page: shown only if we wrote it."""
        return self._mac("msg", text)[:32]

    def verify(self, text: str, sig: str | None) -> bool:
        return bool(sig) and hmac.compare_digest(self.sign(text), sig)

    # -- the API's bearer token ----------------------------------------------------------------

    def bearer(self, authorization: str | None) -> int:
        """200 if the API may act, else the status to answer: 401 no token given, 403 a wrong one."""
        if self.token is None:
            return 200
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return 401
        return 200 if self.token_matches(value.strip()) else 403

    def token_matches(self, value: str) -> bool:
        return self.token is not None and hmac.compare_digest(value.encode(), self.token.encode())

    # -- where a request comes from ---------------------------------------------------------------

    def host_ok(self, host: str | None) -> bool:
        return self.hosts is None or (host or "").lower() in self.hosts


def same_origin(origin: str | None, fetch_site: str | None, scheme: str, host: str | None) -> bool:
    """Nothing says the request came from another site. Browsers send Origin with every POST and
    Sec-Fetch-Site with every request; curl sends neither, and needs neither."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    if origin is None:
        return True
    return host is not None and origin.lower() == f"{scheme}://{host}".lower()


def simple_content_type(content_type: str | None) -> bool:
    """A content type a page of another site can post without a CORS preflight (or none at all)."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return base == "" or base in SIMPLE_TYPES


def read_token(path: str) -> str:
    """The token in a --http-token-file: its text without surrounding whitespace."""
    from task_pipeline.errors import UsageError

    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"--http-token-file {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--http-token-file {path}: not UTF-8 text; put the token in it as text") from None
    if st.st_mode & 0o004:
        raise UsageError(f"--http-token-file {path}: every user can read it; chmod o-r {path} (or 600)")
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise UsageError(f"--http-token-file {path}: the token must be one word of at least {MIN_TOKEN} characters; "
                         f"make one with: head -c 32 /dev/urandom | base64 > {path}")
    return token


def local_path(target: str | None, default: str = "/") -> str:
    """Where a form may send the browser afterwards: a path on this server, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or any(
            ord(c) < 0x20 for c in target):
        return default
    return target
