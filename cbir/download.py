"""The safe URL downloader: http(s) URLs fetched in a way that is safe to point at strangers' URLs.

`Downloader.fetch(url)` (urllib3 underneath):

- only `http` and `https`; no user:password@, no control characters, at most 2,048 characters;
- the host name is resolved **once** and every address it resolves to is checked against the
  `UrlPolicy` (by default: public addresses only — no loopback, private, link-local, CGNAT,
  multicast or reserved ranges, IPv4-mapped IPv6 included); the connection then goes to that
  checked address (Host header and TLS name stay the URL's), so a DNS answer that changes between
  the check and the connection (DNS rebinding) cannot redirect it;
- redirects are followed by hand, at most `max_redirects`, each target checked like the first URL;
- connect and total time limits: a body that trickles in slower than the total limit is cut off;
- a size limit (Content-Length checked first, then the bytes as they arrive) and a content-type
  check (`image/*` by default);
- retries with exponential backoff (and Retry-After) for what may pass: connection errors,
  timeouts, 408/429/5xx; never for a refusal or a 4xx;
- at most `per_host` downloads from one host at a time.

Every failure is a `FetchError` whose message says why; `transient` tells whether trying again
later may succeed. The gateway's SearchByUrl uses the same downloader with its own policy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import ipaddress
import logging
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Sequence

import urllib3


log = logging.getLogger(__name__)

USER_AGENT = "cbir-index-build/0.1 (+https://github.com/cbir)"
MAX_URL_CHARS = 2048
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 64 * 1024


class FetchError(Exception):
    """The bytes could not be read; the message says why. `transient`: trying again later may work."""

    transient = False


class UrlRefused(FetchError):
    """The URL is not allowed: its scheme, its form, or the address it (or a redirect) leads to."""


class FetchTimeout(FetchError):
    transient = True


class TooLarge(FetchError):
    pass


class WrongContentType(FetchError):
    pass


class HttpStatus(FetchError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.transient = status in _TRANSIENT_STATUS


class NetworkError(FetchError):
    transient = True


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is not a public address (None when it is one)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            why = _refusal(embedded)
            return f"{why} (inside the IPv6 address)" if why else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a public address"
    return None


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    """Which addresses may be fetched. Default: public ones only.

    `allow_private` admits every address (loopback, private, link-local included); `allow_networks`
    admits these networks only (e.g. `10.1.2.0/24` for an internal image server). `hint` is added
    to refusals: where the setting that would allow it lives.
    """

    allow_private: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hint: str = ""

    @classmethod
    def build(cls, allow_private: bool = False, allow_networks: Iterable[str] = (), hint: str = "") -> "UrlPolicy":
        return cls(allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks), hint)

    def refusal(self, ip) -> str | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.allow_private and not (ip.is_unspecified or ip.is_multicast):
            return None
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return None
        return _refusal(ip)


@dataclasses.dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 20.0  # one attempt, from connecting to the last byte (redirects included)
    connect_timeout_s: float = 5.0
    max_redirects: int = 3
    content_types: tuple[str, ...] = ("image/",)  # accepted Content-Type prefixes; () = any
    retries: int = 3  # more attempts for transient failures
    backoff_s: float = 0.5  # before the first retry; doubles each time (with jitter)
    max_backoff_s: float = 10.0
    per_host: int = 4  # downloads from one host at once


@dataclasses.dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # after redirects
    attempts: int


@dataclasses.dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as in the URL (name or literal), no brackets
    port: int
    request_path: str
    host_header: str


def parse_url(url: str) -> _Target:
    """Check the URL's form; UrlRefused saying what is wrong."""
    if not isinstance(url, str) or not url:
        raise UrlRefused("the URL is empty")
    if len(url) > MAX_URL_CHARS:
        raise UrlRefused(f"the URL is {len(url)} characters long, more than {MAX_URL_CHARS}")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url) or "\\" in url:
        raise UrlRefused("the URL contains spaces, control characters or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UrlRefused(f"the URL cannot be parsed: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs are fetched, not {scheme + ':' if scheme else 'this'} ({url[:80]!r})")
    if "@" in parts.netloc:
        raise UrlRefused("URLs with a user name or password (user:pass@host) are not fetched")
    host = parts.hostname or ""
    if not host:
        raise UrlRefused("the URL has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not _is_ip(host) else host
    except UnicodeError:
        raise UrlRefused(f"the host name {host!r} is not a valid internet name") from None
    port = port or (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise UrlRefused(f"port {port} is not a valid port")
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    default = port == (443 if scheme == "https" else 80)
    shown = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    return _Target(scheme, ascii_host, port, path, shown if default else f"{shown}:{port}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


class Downloader:
    """Fetches http(s) URLs under a `UrlPolicy` and `FetchLimits` (see the module's docstring).

    `resolve(host, port) -> [ip, ...]` is the name lookup (the system's by default); tests and the
    fuzzers pass their own to decide what names resolve to.
    """

    def __init__(
        self,
        policy: UrlPolicy = UrlPolicy(),
        limits: FetchLimits = FetchLimits(),
        *,
        user_agent: str = USER_AGENT,
        resolve: Callable[[str, int], Sequence[str]] = _system_resolve,
        ca_file: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.policy = policy
        self.limits = limits
        self.user_agent = user_agent
        self._resolve = resolve
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._sleep = sleep
        self._active: dict[str, int] = {}  # downloads running per host (entries removed at 0)
        self._hosts = threading.Condition()
        self._resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")
        self._connections: collections.deque[tuple[str, int]] = collections.deque(maxlen=1000)

    @property
    def connections(self) -> list[tuple[str, int]]:
        """(ip, port) of the connections opened lately (the last 1,000), oldest first: what tests check."""
        return list(self._connections)

    def close(self) -> None:
        self._resolver_pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- checks
    def check(self, url: str, *, timeout_s: float | None = None) -> tuple[_Target, str]:
        """Parse `url` and resolve its host once: (target, the checked address to connect to)."""
        target = parse_url(url)
        return target, self._checked_address(target, timeout_s or self.limits.connect_timeout_s)

    def _checked_address(self, target: _Target, timeout_s: float) -> str:
        if _is_ip(target.host):
            addresses = [target.host]
        else:
            future = self._resolver_pool.submit(self._resolve, target.host, target.port)
            try:
                addresses = list(dict.fromkeys(future.result(timeout=max(0.01, timeout_s))))
            except concurrent.futures.TimeoutError:
                raise FetchTimeout(f"looking up {target.host} took longer than {timeout_s:.3g} s") from None
            except (OSError, UnicodeError) as error:
                raise NetworkError(f"cannot resolve {target.host}: {getattr(error, 'strerror', None) or error}") from None
        if not addresses:
            raise NetworkError(f"{target.host} resolves to no address")
        for text in addresses:
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise UrlRefused(f"{target.host} resolves to {text!r}, which is not an IP address") from None
            why = self.policy.refusal(ip)
            if why:
                name = "" if target.host == text else f"{target.host} resolves to "
                hint = f" ({self.policy.hint})" if self.policy.hint else ""
                raise UrlRefused(f"refused: {name}{ip}, {why}; only public addresses are fetched{hint}")
        return addresses[0].split("%", 1)[0]

    # ---------------------------------------------------------------- fetching
    def fetch(self, url: str, *, deadline: float | None = None) -> Fetched:
        """The body of `url` (an image, within the limits), retrying transient failures.
        `deadline` (time.monotonic()) bounds everything, retries and backoff included."""
        attempts = 0
        delay = self.limits.backoff_s
        while True:
            attempts += 1
            try:
                data, content_type, final = self._attempt(url, deadline)
                return Fetched(data, content_type, final, attempts)
            except FetchError as error:
                retry_after = getattr(error, "retry_after", None)
                if not error.transient or attempts > self.limits.retries:
                    if attempts > 1 and error.transient:
                        error.args = (f"{error} (after {attempts} attempts)",)
                    raise
                wait = min(self.limits.max_backoff_s, retry_after if retry_after is not None else delay)
                wait *= random.uniform(0.8, 1.2) if retry_after is None else 1.0
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise
                log.debug("retrying %s in %.2fs: %s", url, wait, error)
                self._sleep(wait)
                delay = min(self.limits.max_backoff_s, delay * 2)

    def _enter_host(self, host: str, timeout: float) -> bool:
        """Wait (up to `timeout`) until fewer than `per_host` downloads from `host` run; take a place."""
        deadline = time.monotonic() + timeout
        with self._hosts:
            while self._active.get(host, 0) >= self.limits.per_host:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._hosts.wait(remaining)
            self._active[host] = self._active.get(host, 0) + 1
            return True

    def _leave_host(self, host: str) -> None:
        with self._hosts:
            left = self._active[host] - 1
            if left:
                self._active[host] = left
            else:
                del self._active[host]
            self._hosts.notify_all()

    def _attempt(self, url: str, deadline: float | None) -> tuple[bytes, str, str]:
        limits = self.limits
        end = time.monotonic() + limits.timeout_s
        if deadline is not None:
            end = min(end, deadline)
        current = url
        for hop in range(limits.max_redirects + 1):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise FetchTimeout(f"downloading {url} took longer than {limits.timeout_s:g} s")
            target, ip = self.check(current, timeout_s=min(limits.connect_timeout_s, remaining))
            if not self._enter_host(target.host, max(0.0, end - time.monotonic())):
                raise FetchTimeout(f"no download slot for {target.host} within the time limit ({limits.per_host} at once)")
            try:
                location = self._request(current, target, ip, end)
            finally:
                self._leave_host(target.host)
            if isinstance(location, tuple):
                return (*location, current)
            current = urllib.parse.urljoin(current, location)
        raise UrlRefused(f"{url} redirects more than {limits.max_redirects} times")

    def _request(self, url: str, target: _Target, ip: str, end: float):
        """One request to the checked address: (data, content type), or the redirect's Location."""
        limits = self.limits
        remaining = max(0.01, end - time.monotonic())
        timeout = urllib3.Timeout(connect=min(limits.connect_timeout_s, remaining), read=remaining)
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                ip, target.port, timeout=timeout, retries=False, maxsize=1,
                server_hostname=target.host, assert_hostname=target.host, ssl_context=self._ssl,
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip, target.port, timeout=timeout, retries=False, maxsize=1)
        self._connections.append((ip, target.port))
        headers = {
            "Host": target.host_header, "User-Agent": self.user_agent, "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        try:
            response = pool.urlopen(
                "GET", target.request_path, headers=headers, redirect=False, retries=False,
                preload_content=False, decode_content=False, assert_same_host=False,
            )
            try:
                return self._read(url, response, end)
            finally:
                response.release_conn()
                response.close()
        except FetchError:
            raise
        except urllib3.exceptions.NewConnectionError as error:  # a ConnectTimeoutError subclass: first
            raise NetworkError(f"cannot connect to {url}: {_short(error)}") from None
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError, TimeoutError, socket.timeout):
            raise FetchTimeout(f"downloading {url} took longer than {limits.timeout_s:g} s") from None
        except urllib3.exceptions.SSLError as error:
            raise NetworkError(f"TLS failed for {url}: {error}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise NetworkError(f"cannot download {url}: {_short(reason)}") from None
        finally:
            pool.close()

    def _read(self, url: str, response, end: float):
        limits = self.limits
        status = response.status
        if status in _REDIRECTS:
            location = response.headers.get("Location")
            if not location:
                raise HttpStatus(f"HTTP {status} from {url} without a Location", status)
            return location
        if not 200 <= status < 300:
            error = HttpStatus(f"HTTP {status} from {url}", status)
            error.retry_after = _retry_after(response.headers.get("Retry-After"))
            raise error
        content_type = response.headers.get("Content-Type", "")
        kind = content_type.split(";", 1)[0].strip().lower()
        if limits.content_types and not any(kind.startswith(prefix) for prefix in limits.content_types):
            raise WrongContentType(
                f"{url} is {kind or 'of no stated type'}, not an image (accepted: {', '.join(limits.content_types)})"
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise WrongContentType(f"{url} came {encoding}-encoded; images are fetched unencoded")
        length = response.headers.get("Content-Length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > limits.max_bytes:
                raise TooLarge(f"{url} is {declared} bytes, over the {limits.max_bytes}-byte limit")
        chunks, total = [], 0
        sock = getattr(getattr(response, "connection", None), "sock", None)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise FetchTimeout(f"downloading {url} took longer than {limits.timeout_s:g} s (slow body)")
            if sock is not None:
                sock.settimeout(remaining)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_bytes:
                raise TooLarge(f"{url} is over the {limits.max_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks), content_type


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _short(reason: object) -> str:
    """urllib3 wraps the OS error in layers of repr: keep the readable end ("Connection refused")."""
    text = str(reason)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]*)", text)
    return (found.group(1) if found else text)[:300]
