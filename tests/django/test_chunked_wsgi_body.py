"""A chunked webhook body under WSGI: Django caps its request stream at CONTENT_LENGTH, 0 when the header is
absent, so a signed delivery a proxy forwarded chunked was verified against an empty body and refused as forged
(401, "a secret rotated?"), and an oversized one was not answered 413 (review of the webhook edge). A server that
says the body ends in its stream (``wsgi.input_terminated``: gunicorn, werkzeug) is read from; another is told
what to do. Real ``WSGIRequest`` objects, as such a server builds them."""

from __future__ import annotations

import io

import pytest
from django.core.handlers.wsgi import WSGIRequest

from clerk_sync.errors import PayloadTooLarge, WebhookError
from clerk_sync.integrations.django.views import read_limited_body
from tests import factories as f


def _request(body: bytes, **environ: object) -> WSGIRequest:
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhooks/clerk", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "HTTP_TRANSFER_ENCODING": "chunked"}  # (no CONTENT_LENGTH: the server decoded the chunks)
    return WSGIRequest({**base, **environ})


def test_a_chunked_body_a_server_terminated_is_read_whole_and_bounded() -> None:
    body = f.body_of(f.envelope("user.created", f.user("user_chunked", 10)))
    assert _request(body, **{"wsgi.input_terminated": True}).read() == b""  # what Django reads by itself
    assert read_limited_body(_request(body, **{"wsgi.input_terminated": True}), 1024 * 1024) == body
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 100 bytes"):
        read_limited_body(_request(body, **{"wsgi.input_terminated": True}), 100)


def test_a_chunked_body_a_server_cannot_end_is_refused_saying_what_to_do() -> None:
    body = f.body_of(f.envelope("user.created", f.user("user_chunked", 10)))
    with pytest.raises(WebhookError, match="have the proxy send Content-Length, or serve the app with gunicorn"):
        read_limited_body(_request(body), 1024 * 1024)
    with_length = _request(body, CONTENT_LENGTH=str(len(body)))  # (as Svix sends: unchanged)
    assert read_limited_body(with_length, 1024 * 1024) == body
