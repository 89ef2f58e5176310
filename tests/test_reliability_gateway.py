"""The gateway's retries and deadlines: gRPC's retry policy for idempotent calls only, a deadline budget per
request shared by its upstream calls, and GetStatus showing each upstream's channel. Uses the fake
upstreams of test_gateway.py (real gRPC servers on 127.0.0.1:0)."""

from __future__ import annotations

import json

import grpc
import pytest

from cbir.channels import service_config
from services.gateway.upstreams import EMBEDDER_SERVICE, INDEXER_SERVICE, IDEMPOTENT, retry_policy
from test_gateway import COLORS, FakeEmbedder, FakeIndexer, StatusCode, make_stack, png  # noqa: F401 - fixture


def test_only_idempotent_methods_are_retried_and_retries_are_throttled():
    """The channels' service config names Embed, GetModelInfo and the indexer's read calls, retries only
    UNAVAILABLE, at most 3 attempts, and throttles retries; ReloadBundle (an admin action) is never retried."""
    config = json.loads(service_config(retry_policy(EMBEDDER_SERVICE)))
    (method_config,) = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method_config["name"]} == {
        (EMBEDDER_SERVICE, "Embed"), (EMBEDDER_SERVICE, "GetModelInfo")}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method_config["retryPolicy"]["maxAttempts"] == 3
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    indexer = json.loads(service_config(retry_policy(INDEXER_SERVICE)))["methodConfig"][0]["name"]
    assert "ReloadBundle" not in {n["method"] for n in indexer} and "ReloadBundle" not in IDEMPOTENT[INDEXER_SERVICE]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]


class OnceUnavailableIndexer(FakeIndexer):
    """Answers UNAVAILABLE to the first QueryVector (a replica going away), then normally."""

    def QueryVector(self, request, context):
        if self.behaviour.calls["QueryVector"] == 0:
            self.behaviour.calls["QueryVector"] += 1
            context.abort(StatusCode.UNAVAILABLE, "replica shutting down")
        return super().QueryVector(request, context)


def test_an_unavailable_answer_to_an_idempotent_call_is_retried_by_grpc(make_stack):
    """The first QueryVector fails with UNAVAILABLE; gRPC's retry policy sends it again and the search
    succeeds without the client noticing."""
    stack = make_stack(indexer=OnceUnavailableIndexer())
    response = stack.client.search_image(png(COLORS["red"]), k=2)
    assert [h.item_id for h in response.hits] == ["red", "orange"]
    assert stack.indexer.behaviour.calls["QueryVector"] == 2


def test_the_deadline_budget_bounds_the_whole_request(make_stack):
    """request_timeout_s=0.5 while embed_timeout_s is 30 and the client waits 10 s: a held Embed ends at the
    budget with DEADLINE_EXCEEDED saying so, and the embedder saw a deadline under 1 s."""
    stack = make_stack(request_timeout_s=0.5, embed_timeout_s=30)
    stack.embedder.behaviour.hold_s = 60
    with pytest.raises(grpc.RpcError) as caught:
        stack.client.search_image(png(COLORS["red"]))
    assert caught.value.code() is StatusCode.DEADLINE_EXCEEDED
    assert "deadline budget" in caught.value.details()
    assert max(stack.embedder.behaviour.remaining) < 1
    assert stack.indexer.behaviour.calls["QueryVector"] == 0


def test_status_shows_each_upstreams_channel_state(make_stack):
    """GetStatus reports the gateway's channel to each upstream (READY once used; TRANSIENT_FAILURE or
    CONNECTING/IDLE for one that is down) next to its health, and whether it is reached over TLS."""
    stack = make_stack()
    stack.client.search_image(png(COLORS["red"]))
    status = stack.client.status()
    assert {u.name: (u.state, u.channel, u.tls) for u in status.upstreams} == {
        "embedder": ("SERVING", "READY", False), "indexer": ("SERVING", "READY", False)}
    stack.indexer_service.stop(0)
    status = stack.client.status()
    indexer = next(u for u in status.upstreams if u.name == "indexer")
    assert indexer.state == "UNREACHABLE" and indexer.channel in {"TRANSIENT_FAILURE", "CONNECTING", "IDLE"}
