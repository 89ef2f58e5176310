"""The gateway's upstreams: one channel each, calls with deadlines, errors mapped in one place.

Each upstream gets one channel, created once, that spreads calls over every address its target
resolves to with gRPC's own `round_robin` policy: `dns:///embedder:50051` reaches every replica
a compose/Kubernetes service name resolves to, and `ipv4:10.0.0.1:50051,10.0.0.2:50051` lists
them by hand. A call to an idempotent method (`IDEMPOTENT`: Embed, the indexer's queries and the
info calls; never ReloadBundle) that finds a replica UNAVAILABLE is retried by gRPC itself (up to
3 attempts with backoff, within the same deadline, throttled when most calls fail), which lands
it on the next replica.

Every call's deadline is the shortest of its own timeout and what is left of the request's
`Budget` (services.gateway.budget), and the call is cancelled if the caller goes away. Channels use TLS
(mutual TLS with a client certificate) when configured. `upstream_error` is the one place where an
upstream's status becomes a `cbir.errors` domain error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.channels import ClientTls, Retry, open_channel
from cbir.errors import BadImage, CbirError, UpstreamTimeout, UpstreamUnavailable
from services.gateway.budget import OWN_TIMEOUT, Budget
from cbir.v1 import (
    common_pb2,
    duplicates_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    indexer_pb2,
    indexer_pb2_grpc,
)
from services.gateway.metrics import UPSTREAM_ERRORS, UPSTREAM_SECONDS

log = logging.getLogger(__name__)

EMBEDDER_SERVICE = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name  # "cbir.v1.Embedder"
INDEXER_SERVICE = indexer_pb2.DESCRIPTOR.services_by_name["Indexer"].full_name  # "cbir.v1.Indexer"

# An upstream's status that is the caller's problem: passed through with its code and message.
PASSED_THROUGH = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
# Statuses that mean "that upstream cannot answer right now": the caller may retry later.
UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})

_MAX_DETAIL_CHARS = 1000
# GetStatus reports what it finds in its answer (and UIs poll it): its failures are not news for the log.
STATUS_LOG_LEVEL = logging.DEBUG


class UpstreamRejected(CbirError):
    """An upstream refused the request for a reason the caller can act on; its code passes through."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class UpstreamFailed(CbirError):
    """An upstream failed in a way the caller cannot fix (INTERNAL, UNIMPLEMENTED, a malformed answer)."""

    code = grpc.StatusCode.INTERNAL


# Methods that may be sent twice without harm (they only read or compute): the only ones retried.
IDEMPOTENT = {
    EMBEDDER_SERVICE: ("Embed", "GetModelInfo"),
    INDEXER_SERVICE: ("QueryVector", "QueryItem", "GetItems", "GetIndexInfo", "FindDuplicates"),
}  # a stream is retried only until its first message arrives


def retry_policy(*services: str) -> Retry:
    """gRPC's retry of UNAVAILABLE for the idempotent methods of `services` (see `IDEMPOTENT`)."""
    return Retry({service: IDEMPOTENT[service] for service in services})


def upstream_error(
    name: str, target: str, method: str, error: grpc.RpcError, timeout_s: float, bound: str | None
) -> CbirError:
    """The domain error for a failed call to upstream `name` at `target`. The one place for this."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    if len(details) > _MAX_DETAIL_CHARS:
        details = details[:_MAX_DETAIL_CHARS] + "..."
    if code in PASSED_THROUGH:
        return UpstreamRejected(code, details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        whose = bound or "the gateway's timeout for it"
        return UpstreamTimeout(
            f"{name} at {target} did not answer {method} within {timeout_s:.3g} s ({whose})"
        )
    if code in UNAVAILABLE_CODES:
        return UpstreamUnavailable(f"{name} at {target} is unavailable: {details}")
    hint = f" (is {target} really the {name}?)" if code is grpc.StatusCode.UNIMPLEMENTED else ""
    code_name = code.name if code is not None else "an unknown status"
    return UpstreamFailed(f"{name} at {target} failed {method} with {code_name}: {details}{hint}")


class PendingCall:
    """A call in flight to an upstream; `result()` waits for it and maps its failure."""

    def __init__(
        self, upstream: "Upstream", method: str, future, timeout_s: float, bound: str | None, log_level: int
    ):
        self._upstream = upstream
        self._log_level = log_level
        self._method = method
        self._future = future
        self._timeout_s = timeout_s
        self._bound = bound  # what bounds the call when not its own timeout (Budget.describe)
        self._start = time.perf_counter()
        self._end: float | None = None
        self.seconds: float | None = None
        future.add_done_callback(self._done)

    def _done(self, _future) -> None:
        self._end = time.perf_counter()

    def result(self):
        """The response; raises the mapped domain error when the call failed."""
        name, method = self._upstream.name, self._method
        code = grpc.StatusCode.OK
        try:
            return self._future.result()
        except grpc.FutureCancelledError:
            code = grpc.StatusCode.CANCELLED
            raise UpstreamUnavailable(f"call to {name} {method} was cancelled (the caller went away)") from None
        except grpc.RpcError as error:
            code = error.code() or grpc.StatusCode.UNKNOWN
            mapped = upstream_error(name, self._upstream.target, method, error, self._timeout_s, self._bound)
            if code not in PASSED_THROUGH:
                log.log(self._log_level, "%s", mapped)
            raise mapped from None
        finally:
            self.seconds = (self._end or time.perf_counter()) - self._start
            UPSTREAM_SECONDS.labels(name, method).observe(self.seconds)
            if code is not grpc.StatusCode.OK:
                UPSTREAM_ERRORS.labels(name, method, code.name).inc()


class CallWindow:
    """Upstream calls sent with at most `size` in flight (one more waits for the oldest to end), and what each
    ended with, by key: its response or its domain error. Keeps a batch from taking every slot of an upstream
    (its `max_concurrent_rpcs`)."""

    def __init__(self, size: int):
        self._size = size
        self._in_flight: deque[tuple[Hashable, PendingCall]] = deque()
        self.outcomes: dict[Hashable, object] = {}

    def submit(self, key: Hashable, start: Callable[[], PendingCall]) -> None:
        while len(self._in_flight) >= self._size:
            self._settle_oldest()
        try:
            self._in_flight.append((key, start()))
        except CbirError as error:  # no time left in the budget for it
            self.outcomes[key] = error

    def _settle_oldest(self) -> None:
        key, call = self._in_flight.popleft()
        try:
            self.outcomes[key] = call.result()
        except CbirError as error:
            self.outcomes[key] = error

    def drain(self) -> dict[Hashable, object]:
        """Wait for every call in flight; the outcomes of all the calls submitted."""
        while self._in_flight:
            self._settle_oldest()
        return self.outcomes


class Upstream:
    """One upstream service behind one channel (every replica its target resolves to)."""

    def __init__(self, name: str, target: str, service: str, *, max_message_bytes: int, tls: ClientTls | None = None):
        self.name = name
        self.target = target
        self.service = service
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.channel = open_channel(target, tls=tls, max_message_bytes=max_message_bytes, retry=retry_policy(service))
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.connectivity = "IDLE"
        self.channel.subscribe(self._on_connectivity, try_to_connect=False)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self.connectivity = state.name

    def start(self, method: str, rpc: Callable, request, *, timeout_s: float, budget: Budget | None = None,
              log_level: int = logging.WARNING) -> PendingCall:
        """Send `request` with the shortest of `timeout_s` and what is left of the request's `budget`;
        the call is cancelled if the caller goes away. A failure other than the caller's own problem is
        logged at `log_level` once, here."""
        timeout, bound = self._deadline(method, timeout_s, budget)
        future = rpc.future(request, timeout=timeout)
        if budget is not None and budget.context is not None:
            budget.context.add_callback(future.cancel)  # the caller went away: stop the upstream's work too
        return PendingCall(self, method, future, timeout, bound, log_level)

    def stream(self, method: str, rpc: Callable, request, *, timeout_s: float, budget: Budget | None = None
               ) -> Iterator:
        """The messages of a server-streaming call as they arrive, under the deadline rules of `start`. The
        call is cancelled when the caller goes away or stops reading; a failure raises the mapped domain error
        (logged here unless it is the caller's own problem)."""
        timeout, bound = self._deadline(method, timeout_s, budget)
        call = rpc(request, timeout=timeout)
        context = budget.context if budget is not None else None
        if context is not None:
            context.add_callback(call.cancel)
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield from call
        except grpc.RpcError as error:
            code = error.code() or grpc.StatusCode.UNKNOWN
            if context is not None and not context.is_active():
                raise UpstreamUnavailable(f"call to {self.name} {method} was cancelled (the caller went away)") from None
            mapped = upstream_error(self.name, self.target, method, error, timeout, bound)
            if code not in PASSED_THROUGH:
                log.warning("%s", mapped)
            raise mapped from None
        finally:
            call.cancel()  # nothing once it has ended; else the caller stopped reading: stop the upstream's work
            UPSTREAM_SECONDS.labels(self.name, method).observe(time.perf_counter() - start)
            if code is not grpc.StatusCode.OK:
                UPSTREAM_ERRORS.labels(self.name, method, code.name).inc()

    def _deadline(self, method: str, timeout_s: float, budget: Budget | None) -> tuple[float, str | None]:
        """(the call's timeout: the shortest of `timeout_s` and what is left of `budget`; what bounds it when
        that is not its own timeout, in words)."""
        if budget is None:
            return timeout_s, None
        timeout, bound_by = budget.timeout_for(timeout_s, f"{self.name} {method}")
        return timeout, None if bound_by == OWN_TIMEOUT else budget.describe()

    def check_health(self, *, timeout_s: float) -> PendingCall:
        """grpc.health.v1 Check of this upstream's service (answered by one replica)."""
        request = health_pb2.HealthCheckRequest(service=self.service)
        return self.start("Check", self._health.Check, request, timeout_s=timeout_s, log_level=STATUS_LOG_LEVEL)

    def close(self) -> None:
        self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()


# Room left in an Embed request for what is not image bytes (field tags, lengths, the flags).
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


def _parts(images: Sequence[bytes], max_bytes: int) -> list[list[bytes]]:
    """`images` in order, cut into runs whose bytes add up to at most `max_bytes` (an image larger than that
    alone in its run, for the embedder to refuse): one run unless the images would not fit one message."""
    parts: list[list[bytes]] = []
    size = 0
    for image in images:
        if not parts or (parts[-1] and size + len(image) > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(image)
        size += len(image)
    return parts


class EmbedderUpstream(Upstream):
    def __init__(self, target: str, *, max_message_bytes: int, tls: ClientTls | None = None):
        super().__init__("embedder", target, EMBEDDER_SERVICE, max_message_bytes=max_message_bytes, tls=tls)
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)

    def embed(self, images: Sequence[bytes], *, timeout_s: float, budget: Budget | None = None,
              local_features: bool = False) -> tuple[list[embedder_pb2.EmbedResult], str]:
        """(one EmbedResult per image, same order; the model fingerprint): the images in one Embed call (in as
        few as the message size limit allows, sent at once), with each one's local features (and its mirror's)
        and region vectors when asked and the model has them (what verification uses). A bad image fails only
        its own result (`checked` raises BadImage with the embedder's reason); a failed call raises the mapped
        domain error."""
        calls = [
            (len(part), self.start("Embed", self.stub.Embed, embedder_pb2.EmbedRequest(
                images=part, local_features=local_features, mirrored=local_features, regions=local_features),
                timeout_s=timeout_s,
                budget=budget))
            for part in _parts(images, self.max_message_bytes - _MESSAGE_OVERHEAD_BYTES)
        ]
        results: list[embedder_pb2.EmbedResult] = []
        fingerprint = ""
        for count, call in calls:
            response = call.result()
            if len(response.results) != count:
                raise UpstreamFailed(
                    f"embedder at {self.target} returned {len(response.results)} results for "
                    f"{count} image{'s' if count != 1 else ''}"
                )
            results.extend(response.results)
            fingerprint = response.model_fingerprint
        return results, fingerprint

    def checked(self, result: embedder_pb2.EmbedResult) -> embedder_pb2.EmbedResult:
        """`result` if it holds a vector; BadImage with the embedder's reason, or UpstreamFailed when it holds
        neither."""
        if result.error:
            raise BadImage(result.error)
        if result.vector.dimension == 0:
            raise UpstreamFailed(f"embedder at {self.target} returned neither a vector nor an error")
        return result

    def model_info(self, *, timeout_s: float) -> PendingCall:
        return self.start(
            "GetModelInfo", self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest(),
            timeout_s=timeout_s, log_level=STATUS_LOG_LEVEL,
        )


class IndexerUpstream(Upstream):
    def __init__(self, target: str, *, max_message_bytes: int, tls: ClientTls | None = None):
        super().__init__("indexer", target, INDEXER_SERVICE, max_message_bytes=max_message_bytes, tls=tls)
        self.stub = indexer_pb2_grpc.IndexerStub(self.channel)

    def start_query(self, request: indexer_pb2.QueryVectorRequest | indexer_pb2.QueryItemRequest, *,
                    timeout_s: float, budget: Budget | None = None) -> PendingCall:
        """QueryVector or QueryItem, whichever `request` is, sent without waiting for the answer."""
        if isinstance(request, indexer_pb2.QueryItemRequest):
            return self.start("QueryItem", self.stub.QueryItem, request, timeout_s=timeout_s, budget=budget)
        return self.start("QueryVector", self.stub.QueryVector, request, timeout_s=timeout_s, budget=budget)

    def query(self, request: indexer_pb2.QueryVectorRequest | indexer_pb2.QueryItemRequest, *, timeout_s: float,
              budget: Budget | None = None):
        """The QueryVectorResponse or QueryItemResponse to `request`."""
        return self.start_query(request, timeout_s=timeout_s, budget=budget).result()

    def find_duplicates(self, request: duplicates_pb2.FindDuplicatesRequest, *, timeout_s: float,
                        budget: Budget | None = None) -> Iterator[duplicates_pb2.FindDuplicatesResponse]:
        """The indexer's FindDuplicates stream, message by message."""
        return self.stream("FindDuplicates", self.stub.FindDuplicates, request, timeout_s=timeout_s, budget=budget)

    def index_info(self, *, timeout_s: float) -> PendingCall:
        return self.start(
            "GetIndexInfo", self.stub.GetIndexInfo, indexer_pb2.GetIndexInfoRequest(),
            timeout_s=timeout_s, log_level=STATUS_LOG_LEVEL,
        )
