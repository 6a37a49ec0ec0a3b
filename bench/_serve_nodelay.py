"""``clerk-sync serve --workers N`` with uvicorn's multi-worker TCP_NODELAY bug worked around.

uvicorn's ``Config.bind_socket()`` leaves the listener's ``proto`` at 0, so asyncio never enables
TCP_NODELAY on accepted sockets in ``--workers N`` mode and every keep-alive response waits ~40 ms
for the peer's delayed ACK (Kludex/uvicorn#3149). Re-wrapping the fd with ``IPPROTO_TCP`` fixes it.
Used by bench/ingest.py for an extra row only; the suggested fix for src/clerk_sync/cli.py is the same.

    DATABASE_URL=... CLERK_WEBHOOK_SIGNING_SECRET=... python bench/_serve_nodelay.py PORT WORKERS
"""

from __future__ import annotations

import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from clerk_sync import migrations
from clerk_sync.config import Settings
from clerk_sync.integrations.starlette import build_processor


def main() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    migrations.upgrade(build_processor(Settings.from_env()).store.engine)
    config = uvicorn.Config("clerk_sync.integrations.starlette:app_from_env", factory=True, host="127.0.0.1",
                            port=port, workers=workers, log_level="warning")
    bound = config.bind_socket()
    sock = socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main()
