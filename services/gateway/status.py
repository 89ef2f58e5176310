"""GetStatus: each upstream's health, the embedder's model, the indexer's bundle, and whether they fit.

All four checks run at once, each within the status timeout, and none of them can make the
answer fail: a check that does not come back is reported in the answer instead.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from cbir.errors import CbirError
from cbir.v1 import common_pb2, gateway_pb2
from services.gateway.upstreams import EmbedderUpstream, IndexerUpstream, PendingCall, Upstream

UNREACHABLE = "UNREACHABLE"
_UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _health_state(upstream: Upstream, pending: PendingCall) -> gateway_pb2.UpstreamStatus:
    status = gateway_pb2.UpstreamStatus(
        name=upstream.name, target=upstream.target, channel=upstream.connectivity, tls=upstream.tls is not None
    )
    try:
        response = pending.result()
    except CbirError as error:
        if error.code in _UNREACHABLE_CODES:
            status.state, status.detail = UNREACHABLE, str(error)
        elif error.code is grpc.StatusCode.NOT_FOUND:
            status.state = "UNKNOWN"
            status.detail = f"the health service at {upstream.target} does not know {upstream.service}"
        else:  # UNIMPLEMENTED: a server without grpc.health.v1, or something else answering
            status.state, status.detail = "UNKNOWN", f"health check failed: {error}"
        return status
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    status.state = "UNKNOWN" if state == "SERVICE_UNKNOWN" else state
    return status


def _info(upstream: Upstream, pending: PendingCall, field: str, status: gateway_pb2.UpstreamStatus):
    """The ModelInfo/IndexInfo of a response, or None with the reason added to `status.detail`."""
    try:
        response = pending.result()
    except CbirError as error:
        if status.state != UNREACHABLE:  # an unreachable upstream's detail already says why
            status.detail = "; ".join(filter(None, [status.detail, str(error)]))
        return None
    if not response.HasField(field):
        status.detail = "; ".join(filter(None, [status.detail, f"{upstream.name} sent no {field} info"]))
        return None
    return getattr(response, field)


def _describe(model: common_pb2.ModelInfo) -> str:
    pooling = f", {model.pooling}" if model.pooling else ""
    return f"{model.name}/{model.feature} ({model.dimension}-d{pooling}, weights {model.weights_source or '?'})"


def compatibility(model: common_pb2.ModelInfo | None, index: common_pb2.IndexInfo | None) -> tuple[bool, str]:
    """(compatible, detail): can the indexer's bundle answer queries embedded by this embedder?"""
    missing = []
    if model is None:
        missing.append("no model info from the embedder")
    elif not model.fingerprint:
        missing.append("the embedder reports no model fingerprint")
    if index is None:
        missing.append("no index info from the indexer")
    elif not (index.model_fingerprint or index.model.fingerprint):
        missing.append("the index bundle records no model fingerprint")
    if missing:
        return False, "cannot tell whether the embedder and the index fit: " + "; ".join(missing)
    bundle_fingerprint = index.model_fingerprint or index.model.fingerprint
    if model.fingerprint == bundle_fingerprint:
        return True, ""
    return False, (
        f"the embedder's model fingerprint {model.fingerprint} differs from the index bundle's "
        f"{bundle_fingerprint}: the embedder runs {_describe(model)}, bundle {index.bundle_version or '?'} "
        f"was built with {_describe(index.model)}; run the embedder with the bundle's model or rebuild the index"
    )


def gather_status(
    embedder: EmbedderUpstream, indexer: IndexerUpstream, *, timeout_s: float
) -> gateway_pb2.GetStatusResponse:
    """Ask both upstreams at once; every check is bounded by `timeout_s`."""
    embedder_health = embedder.check_health(timeout_s=timeout_s)
    model_call = embedder.model_info(timeout_s=timeout_s)
    indexer_health = indexer.check_health(timeout_s=timeout_s)
    index_call = indexer.index_info(timeout_s=timeout_s)

    embedder_status = _health_state(embedder, embedder_health)
    model = _info(embedder, model_call, "model", embedder_status)
    indexer_status = _health_state(indexer, indexer_health)
    index = _info(indexer, index_call, "index", indexer_status)
    compatible, detail = compatibility(model, index)
    response = gateway_pb2.GetStatusResponse(
        upstreams=[embedder_status, indexer_status], compatible=compatible, detail=detail
    )
    if model is not None:
        response.model.CopyFrom(model)
    if index is not None:
        response.index.CopyFrom(index)
    return response
