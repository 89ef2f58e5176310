"""SearchByUrl's download: a stranger's URL fetched without letting it reach inside the network (SSRF).

`UrlFetcher` wraps `cbir.download.Downloader` with the gateway's policy and limits (only
http(s); public addresses only unless `url_allow_private` or `url_allow_networks` say otherwise;
each address resolved once and connected to as checked; redirects re-checked; size, time and
content-type limits) and a cap on downloads at once (one more is refused with RESOURCE_EXHAUSTED,
not queued). Failures become domain errors:

| what happened | status |
|---|---|
| refused URL (scheme, form, address, redirect target), 4xx, too large, not an image type | INVALID_ARGUMENT |
| too slow (connect, headers or body), within the limit or the request's budget | DEADLINE_EXCEEDED |
| could not connect, 5xx, TLS failure | UNAVAILABLE |
| too many downloads at once | RESOURCE_EXHAUSTED |
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import prometheus_client

from cbir.errors import InvalidRequest, Overloaded, UpstreamTimeout, UpstreamUnavailable
from cbir.download import (
    Downloader, FetchError, Fetched, FetchLimits, FetchTimeout, HttpStatus, NetworkError, UrlPolicy,
)
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

USER_AGENT = "cbir-gateway/0.1 (SearchByUrl)"

URL_FETCHES = prometheus_client.Counter(
    "cbir_gateway_url_fetches_total",
    "SearchByUrl downloads by result (ok, refused, too_large, wrong_type, http_error, timeout, network, busy).",
    ["result"],
)
URL_BYTES = prometheus_client.Counter("cbir_gateway_url_fetched_bytes", "Bytes downloaded by SearchByUrl.")


def _result(error: FetchError) -> str:
    name = type(error).__name__
    return {
        "UrlRefused": "refused", "TooLarge": "too_large", "WrongContentType": "wrong_type", "HttpStatus": "http_error",
        "FetchTimeout": "timeout", "NetworkError": "network",
    }.get(name, "failed")


class UrlFetcher:
    def __init__(self, downloader: Downloader, max_concurrent: int):
        self.downloader = downloader
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, *, resolve: Callable[[str, int], Sequence[str]] | None = None,
        ca_file: str | None = None,
    ) -> "UrlFetcher":
        policy = UrlPolicy.build(
            settings.url_allow_private, settings.url_allow_networks,
            hint="a gateway setting allows others: CBIR_GATEWAY_URL_ALLOW_NETWORKS or CBIR_GATEWAY_URL_ALLOW_PRIVATE",
        )
        limits = FetchLimits(
            max_bytes=settings.url_max_bytes, timeout_s=settings.url_timeout_s,
            connect_timeout_s=settings.url_connect_timeout_s, max_redirects=settings.url_max_redirects,
            content_types=tuple(settings.url_content_types), retries=settings.url_retries, backoff_s=0.2,
            max_backoff_s=2.0, per_host=settings.url_per_host,
        )
        extra = {"resolve": resolve} if resolve is not None else {}
        return cls(Downloader(policy, limits, user_agent=USER_AGENT, ca_file=ca_file, **extra), settings.url_max_concurrent)

    def fetch(self, url: str, *, deadline: float) -> Fetched:
        if not self._slots.acquire(blocking=False):
            URL_FETCHES.labels("busy").inc()
            raise Overloaded(
                f"the gateway is already downloading {self.max_concurrent} images for other searches; retry shortly, "
                "or send the image bytes with SearchByImage"
            )
        try:
            fetched = self.downloader.fetch(url, deadline=deadline)
        except FetchTimeout as error:
            URL_FETCHES.labels("timeout").inc()
            raise UpstreamTimeout(f"could not download the image in time: {error}") from None
        except (NetworkError,) as error:
            URL_FETCHES.labels("network").inc()
            raise UpstreamUnavailable(f"could not download the image: {error}") from None
        except HttpStatus as error:
            URL_FETCHES.labels("http_error").inc()
            if error.status >= 500:
                raise UpstreamUnavailable(f"could not download the image: {error}") from None
            raise InvalidRequest(f"could not download the image: {error}") from None
        except FetchError as error:
            URL_FETCHES.labels(_result(error)).inc()
            raise InvalidRequest(f"cannot search by this URL: {error}") from None
        finally:
            self._slots.release()
        URL_FETCHES.labels("ok").inc()
        URL_BYTES.inc(len(fetched.data))
        return fetched

    def close(self) -> None:
        self.downloader.close()
