"""HTTP floor for bench/ingest.py: Starlette under uvicorn, read the body, answer 200 JSON, nothing else.

The service uses the same stack (uvicorn single worker + Starlette), so this is the ceiling any
per-request work in clerk-sync is subtracted from.   uvicorn --app-dir bench _null_app:app
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"status": "ok", "bytes": len(body)})


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/webhooks/clerk", webhook, methods=["POST"]), Route("/healthz", healthz)])
