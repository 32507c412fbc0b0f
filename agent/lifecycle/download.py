"""One bounded HTTPS GET of a public document (the directory's participants list): the server verified
against the system store or a given CA file, a size cap, timeouts, no redirects followed."""

from __future__ import annotations

import urllib.parse

import urllib3

from agent.errors import InputError

CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 60.0
_CHUNK = 1 << 16


class DownloadError(InputError):
    hint = "check the URL and that this host reaches it (or download the file and give its path)"


def fetch(url: str, limit: int, cafile: str | None = None) -> bytes:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise DownloadError(f"{url!r} is not an https:// URL")
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=cafile, retries=False,
                               timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT))
    try:
        response = pool.request("GET", url, headers={"Accept": "application/json"}, preload_content=False,
                                redirect=False)
        try:
            if response.status != 200:
                raise DownloadError(f"{url} answered HTTP {response.status}")
            data = bytearray()
            for chunk in response.stream(_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise DownloadError(f"{url} sent more than {limit:,} bytes: not the document expected")
            return bytes(data)
        finally:
            response.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot fetch {url}: {reason}") from None
    finally:
        pool.clear()
