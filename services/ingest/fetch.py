"""Fetch a document from a link a user gave us, without letting the link reach inside our network.

Server-side request forgery is the danger: a link to 127.0.0.1, 10.0.0.5 or the cloud metadata
address 169.254.169.254 would make the service read things the user cannot. So, for every hop
(the first request and each redirect): only http/https; the host is resolved once, every address
it resolves to must be public (IPv4 and IPv6, including IPv4-mapped, 6to4 and NAT64 forms of
private addresses), and the connection goes to that vetted address itself — the Host header and
TLS SNI/certificate check still use the name — so DNS rebinding cannot swap the address between
check and use. Redirects, size and total time are capped; the body is streamed and abandoned as
soon as it passes the cap.

Plain `http.client` is used on purpose: it lets us open the socket to a given address ourselves.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.ingest.uploads import clean_filename

MAX_REDIRECTS = 5
USER_AGENT = "doclora-fetch/0.1 (+self-hosted document ingest)"
_CHUNK = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_ARXIV_ABS = re.compile(r"^/abs/(.+?)/?$")


@dataclass
class Fetched:
    data: bytes
    final_url: str
    content_type: str | None  # media type only, lower case: "application/pdf"
    filename: str | None  # from Content-Disposition, else the URL's last path segment (cleaned)


def arxiv_pdf_url(url: str) -> str:
    """arxiv.org/abs/ID -> arxiv.org/pdf/ID: a person who links the abstract page means the paper."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == "arxiv.org" or host.endswith(".arxiv.org"):
        found = _ARXIV_ABS.match(parts.path)
        if found:
            return urlunsplit((parts.scheme, parts.netloc, f"/pdf/{found.group(1)}", "", ""))
    return url


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 forms of IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64_LOCAL or ip.teredo is not None:
            return False  # tunnels whose far end we cannot vet
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an acceptable URL, or InvalidArgument."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"the link is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme or "none"
        raise InvalidArgument(f"only http and https links can be fetched (this one's scheme is {shown!r})")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise InvalidArgument("the link has no host name")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # bücher.example -> xn--bcher-kva.example
        except UnicodeError:
            raise InvalidArgument(f"the link's host name {host!r} is not valid") from None
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("links with a user name or password in them are not supported")
    port = port or (443 if scheme == "https" else 80)
    # the request line must be ASCII: escape what the user typed raw, keep existing %XX escapes
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    return scheme, host, port, target


def _resolve(host: str, port: int, allow_private: bool, deadline: float) -> list[str]:
    """The host's addresses, all of them vetted; refused if any is not public."""
    if time.monotonic() >= deadline:
        raise Unavailable("fetching the link took too long")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN,):
            raise Unavailable(f"could not look up {host!r} right now; try again") from None
        raise InvalidArgument(f"the host {host!r} does not exist (DNS lookup failed)") from None
    addresses: list[str] = []
    for _, _, _, _, sockaddr in infos:
        address = sockaddr[0].split("%", 1)[0]  # drop an IPv6 zone index
        ip = ipaddress.ip_address(address)
        if not allow_private and not is_public_address(ip):
            # one private answer is enough to refuse: the name points inside
            raise InvalidArgument(
                f"the link's host {host!r} resolves to {ip}, a private, loopback, link-local or "
                "reserved address; only public internet addresses can be fetched"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidArgument(f"the host {host!r} has no address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a vetted address; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted address; SNI and the certificate check use the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def _filename(headers: Message, url: str) -> str | None:
    """The name the server gives the file (Content-Disposition, `filename*=UTF-8''…` or a plain
    `filename`, which many servers send as raw UTF-8), else the link's last path segment, as a
    display name (`clean_filename`); None when there is none."""
    name = None
    disposition = headers.get("Content-Disposition")
    if disposition:
        message = Message()
        message["Content-Disposition"] = disposition
        params = message.get_params([], header="content-disposition")
        names = [v for k, v in params if k.lower() == "filename" and v]
        # RFC 6266: the encoded `filename*` (a tuple here) wins over a plain `filename`
        name = next((v for v in names if isinstance(v, tuple)), names[0] if names else None)
        if isinstance(name, tuple):
            name = collapse_rfc2231_value(name)
        elif name:
            # http.client reads header bytes as Latin-1: raw UTF-8 shows as mojibake until re-read
            with contextlib.suppress(UnicodeError):
                name = name.encode("latin-1").decode("utf-8")
        if name:
            name = clean_filename(name, "")
    if not name:
        name = clean_filename(unquote(urlsplit(url).path.rsplit("/", 1)[-1]), "")
    return name or None


def _read_body(
    response: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, deadline: float, timeout_s: float
) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise ResourceExhausted(
            f"the document is {int(length) / 1e6:.1f} MB; at most {max_bytes / 1e6:.1f} MB can be fetched"
        )
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    # we ask for identity; a server that compresses anyway is unpacked under the same size cap
    inflater = zlib.decompressobj(wbits=47) if encoding in ("gzip", "x-gzip", "deflate") else None
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise Unavailable(f"fetching the link took longer than {timeout_s:g} s")
        # each read may wait only for what is left of the whole fetch's time
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = response.read1(_CHUNK)
        except TimeoutError:
            raise Unavailable(f"fetching the link took longer than {timeout_s:g} s") from None
        except (http.client.HTTPException, OSError) as exc:
            raise Unavailable(f"the connection broke while fetching the link ({exc})") from None
        if not chunk:
            break
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk, max_bytes + 1 - size)
            except zlib.error as exc:
                raise InvalidArgument(f"the server sent a broken {encoding} body ({exc})") from None
        size += len(chunk)
        if size > max_bytes:
            raise ResourceExhausted(
                f"the document is larger than {max_bytes / 1e6:.1f} MB, the most that can be fetched"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool = False,
    allow_hosts: Collection[str] = (),
) -> Fetched:
    """GET `url` safely (see the module docstring) and return its body and what it says it is.

    `allow_private=True` lifts the address check everywhere; `allow_hosts` lifts it only for
    those host names (as written in the URL). Both exist for tests and for operators who mean to
    ingest from their own network; the default refuses. Raises InvalidArgument (refused or bad
    link, HTTP 4xx), ResourceExhausted (over `max_bytes`) or Unavailable (time-out, network, 5xx).
    """
    deadline = time.monotonic() + timeout_s
    allowed = {h.lower().strip("[]") for h in allow_hosts}
    context = ssl.create_default_context()
    current = arxiv_pdf_url(url.strip())
    for hop in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _check_url(current)
        addresses = _resolve(host, port, allow_private or host in allowed, deadline)
        response, sock, connection = _request(
            scheme, host, port, target, addresses, context, deadline, timeout_s
        )
        try:
            status = response.status
            if status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise InvalidArgument(f"the server answered {status} without saying where to go")
                if hop == MAX_REDIRECTS:
                    raise InvalidArgument(f"the link redirects more than {MAX_REDIRECTS} times")
                current = arxiv_pdf_url(urljoin(current, location.strip()))
                continue
            if status >= 500:
                raise Unavailable(f"the server answered {status} {response.reason}; try again later")
            if status >= 400:
                raise InvalidArgument(f"the server answered {status} {response.reason} for {current}")
            if status != 200:
                raise InvalidArgument(f"the server answered {status} {response.reason}, not a document")
            data = _read_body(response, sock, max_bytes, deadline, timeout_s)
            media = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower() or None
            return Fetched(
                data=data,
                final_url=current,
                content_type=media,
                filename=_filename(response.headers, current),
            )
        finally:
            connection.close()
    raise AssertionError("unreachable")  # the loop returns or raises


def _request(
    scheme: str,
    host: str,
    port: int,
    target: str,
    addresses: list[str],
    context: ssl.SSLContext,
    deadline: float,
    timeout_s: float,
):
    last: Exception | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if scheme == "https":
            connection = _PinnedHTTPSConnection(host, port, address, remaining, context)
        else:
            connection = _PinnedHTTPConnection(host, port, address, remaining)
        try:
            connection.putrequest("GET", target, skip_accept_encoding=True)
            connection.putheader("Accept-Encoding", "identity")
            connection.putheader("User-Agent", USER_AGENT)
            connection.putheader("Accept", "application/pdf,text/html;q=0.9,*/*;q=0.8")
            connection.endheaders()
            # kept here: for a response that closes the connection, http.client drops
            # connection.sock, but the body is still read from this socket
            sock = connection.sock
            return connection.getresponse(), sock, connection
        except TimeoutError:
            connection.close()
            raise Unavailable(f"fetching the link took longer than {timeout_s:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise InvalidArgument(f"the site's TLS certificate is not valid ({exc.verify_message})") from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            last = exc  # try the host's next address
    if last is None:
        raise Unavailable(f"fetching the link took longer than {timeout_s:g} s")
    raise Unavailable(f"could not connect to {host} ({last})")
