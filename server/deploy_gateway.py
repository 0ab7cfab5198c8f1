"""The coordinator's public port: Flower's Fleet API only, never its Control or Runtime API.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register/unregister``) and the Runtime API (the ServerApp) from one FastAPI app on one ``--host
--port``, and its open-source Control API has no login (``NoOpControlAuthnPlugin`` unless
``FLWR_OIDC_ENABLED``, which this distribution lacks). Anyone who reached that port with the public
``ca.crt`` could register nodes and unregister real sites. So facefed binds the SuperLink to
``127.0.0.1:<control-port>`` and puts this gateway on the public address: a TLS server (the
SuperLink's own certificate) that forwards to the SuperLink only ``POST`` requests, without a query,
to the twelve Fleet paths a SuperNode calls (``flwr/supernode/fleet_http_client.py``). Every other request gets
404 without reaching the SuperLink. The SuperLink sees every request come from 127.0.0.1.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Hop-by-hop headers (RFC 9110 §7.6.1) and the client-address headers the SuperLink's uvicorn trusts
# from 127.0.0.1, i.e. from this gateway: a SuperNode must not choose what they say.
_DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
REFUSAL = b"facefed gateway: this port serves only Flower's Fleet API\n"


def _kept(name: str) -> bool:
    return name.lower() not in _DROPPED_HEADERS


class FleetGateway:
    """ASGI app forwarding the Fleet API to ``upstream``; everything else is refused with 404."""

    def __init__(
        self, upstream: str, ca_file: Path, transport: httpx.AsyncBaseTransport | None = None
    ):
        """Forward to ``https://upstream`` (host:port), verifying its certificate with ``ca_file``.

        ``transport`` replaces the network (tests).
        """
        self.upstream = upstream
        self.ca_file = ca_file
        self.transport = transport
        self.client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=str(self.ca_file))
                if self.transport is None
                else True
            )
            self.client = httpx.AsyncClient(
                base_url=f"https://{self.upstream}",
                verify=verify,
                transport=self.transport,
                # Flower's own Fleet client sets no read timeout on streamed pulls either.
                timeout=httpx.Timeout(connect=10.0, read=None, write=120.0, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self.client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
        elif (
            scope["method"] != "POST"
            or scope["path"] not in FLEET_PATHS
            or scope.get("query_string")
        ):
            logger.warning(
                "refused %s %s from %s", scope["method"], scope["path"], scope.get("client")
            )
            await _respond(send, 404, REFUSAL)
        else:
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if _kept(k.decode("latin-1"))
        ]
        client = self._client()
        request = client.build_request("POST", scope["path"], headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            logger.error("SuperLink on %s unreachable: %s", self.upstream, exc)
            await _respond(send, 502, b"facefed gateway: SuperLink unreachable\n")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if _kept(k)
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve(
    *, host: str, port: int, upstream: str, certfile: Path, keyfile: Path, ca_file: Path
) -> None:
    """Run the gateway until SIGTERM/SIGINT (blocking)."""
    import uvicorn

    config = uvicorn.Config(
        FleetGateway(upstream, ca_file),
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        log_level="info",
        access_log=False,
    )
    logger.info("gateway on %s:%d -> Fleet API of the SuperLink on %s", host, port, upstream)
    uvicorn.Server(config).run()
