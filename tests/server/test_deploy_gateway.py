"""The public gateway forwards Flower's Fleet API and refuses everything else before the SuperLink.

The SuperLink is replaced by an ``httpx.MockTransport`` that records what reaches it; the real-process
version of these checks is ``tests/integration/test_deploy_negative.py``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from flwr.superlink.routers.fleet.router import router as fleet_router

from server import deploy_gateway

PUBLIC = "https://fl.example.org:9093"


class _Streamed(httpx.AsyncByteStream):
    """A response body that arrives as a stream, as from a real SuperLink."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


def _exchange(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[httpx.Response, list[httpx.Request]]:
    """Send one request through the gateway; return its response and what reached the SuperLink."""
    reached: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        reached.append(request)
        return httpx.Response(200, stream=_Streamed(b"from-superlink:" + request.read()))

    gateway = deploy_gateway.FleetGateway(
        "127.0.0.1:9091", Path("unused"), transport=httpx.MockTransport(superlink)
    )

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            response = await client.request(method, path, headers=headers, content=body)
            await response.aread()
            return response

    return asyncio.run(go()), reached


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/register-node"),  # `flwr supernode register`
        ("POST", "/v1/control/unregister-node"),  # `flwr supernode unregister`
        ("POST", "/v1/control/start-run"),  # `flwr run`
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/runtime/pull-task-input"),  # the ServerApp's API
        ("GET", "/docs"),
        ("GET", "/v1/fleet/get-run"),  # right path, wrong method
        ("POST", "/v1/fleet/../control/register-node"),
        ("POST", "/v1/fleet/get-run/../../control/register-node"),
        ("POST", "/v1/fleet/get-run?x=/v1/control/register-node"),
    ],
)
def test_everything_but_the_fleet_api_is_refused_before_the_superlink(
    method: str, path: str
) -> None:
    response, reached = _exchange(method, path, body=b"x")

    assert response.status_code == 404
    assert response.content == deploy_gateway.REFUSAL
    assert reached == []


def test_fleet_call_is_forwarded_with_its_body_and_node_auth_headers() -> None:
    auth = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01"}

    response, reached = _exchange("POST", "/v1/fleet/pull-messages", headers=auth, body=b"pb")

    assert response.status_code == 200 and response.content == b"from-superlink:pb"
    assert [str(r.url) for r in reached] == ["https://127.0.0.1:9091/v1/fleet/pull-messages"]
    assert {k: reached[0].headers[k] for k in auth} == auth


def test_client_chosen_address_headers_do_not_reach_the_superlink() -> None:
    spoofed = {"x-forwarded-for": "127.0.0.1", "forwarded": "for=127.0.0.1", "x-real-ip": "::1"}

    _, reached = _exchange("POST", "/v1/fleet/get-run", headers=spoofed)

    assert not set(spoofed) & set(reached[0].headers)
    assert reached[0].headers["host"] == "127.0.0.1:9091"


def test_gateway_forwards_exactly_the_paths_of_flowers_fleet_api() -> None:
    import flwr.supernode.fleet_http_client as client

    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', Path(client.__file__).read_text()))
    served = {route.path for route in fleet_router.routes}  # type: ignore[attr-defined]

    assert deploy_gateway.FLEET_PATHS == called == served


def test_unreachable_superlink_is_a_502_not_a_crash() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    gateway = deploy_gateway.FleetGateway("127.0.0.1:1", Path("unused"), httpx.MockTransport(down))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            return await client.post("/v1/fleet/get-run", content=b"")

    assert asyncio.run(go()).status_code == 502
