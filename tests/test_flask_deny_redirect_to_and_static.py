"""The Flask face's ``deny_by_default`` on ``redirect_to`` rules and static files: a ``redirect_to`` rule whose endpoint is public answers
its redirect wherever it leads (another site, a path nothing serves), a ``redirect_to`` callable is judged as
a view; and only the static files Flask serves from the app's ``static_folder`` are public by the name
``static``, not a view of the app's own registered under it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from werkzeug.routing import MapAdapter
from werkzeug.test import TestResponse

from clerk_sync.integrations.flask import ClerkSync, clerk_state, public
from tests._flask import running_wsgi
from tests.conftest import SECRET
from tests.test_auth import bearer, token
from tests.test_sessions import ISS, KEY, pem

SLUGS = {1: "alice"}  # what a computed redirect looks up: not for strangers (which id is whose page)


def _config(db_url: str) -> dict[str, Any]:
    return {"DATABASE_URL": db_url, "CLERK_WEBHOOK_SIGNING_SECRET": SECRET, "CLERK_JWT_KEY": pem(KEY),
            "CLERK_ISSUER": ISS}




def guarded_app(sqlite_url: str, public_endpoints: set[str] | frozenset[str] = frozenset(), **flask: Any) -> Flask:
    app = Flask(__name__, **flask)
    app.config["CLERK_SYNC"] = _config(sqlite_url)
    ClerkSync(app, deny_by_default=True, revocation_refresh_s=0, public_endpoints=public_endpoints)
    return app


def answer(app: Flask, path: str, **kwargs: Any) -> tuple[int, str | None]:
    with app.test_client() as client:
        response: TestResponse = client.get(path, **kwargs)
        return response.status_code, response.headers.get("Location")


# -- redirect_to rules ----------------------------------------------------------------------------------------

LISTED = {"away", "retired", "old_admin_listed", "go"}


def add_routes(app: Flask, calls: Counter[str]) -> None:
    """Pages, and ``redirect_to`` rules leading off the app, into it, and computed by the app's code."""

    @app.get("/docs/")
    @public
    def docs() -> str:
        return "docs"

    @app.get("/admin/")
    def admin() -> str:  # protected by deny_by_default alone
        return "every customer"

    @app.get("/profile/<slug>")
    @public
    def profile(slug: str) -> str:
        return f"profile of {slug}"

    def by_id(_adapter: MapAdapter, user_id: int) -> str:
        calls["by_id"] += 1
        return f"/profile/{SLUGS[user_id]}"

    def go(_adapter: MapAdapter, name: str) -> str:
        calls["go"] += 1
        return f"https://elsewhere.example/{name}"

    # listed public (LISTED): answered wherever they lead
    app.add_url_rule("/away", endpoint="away", redirect_to="https://elsewhere.example/landing")
    app.add_url_rule("/retired", endpoint="retired", redirect_to="/gone-for-good")  # nothing serves it
    app.add_url_rule("/old-admin-listed", endpoint="old_admin_listed", redirect_to="/admin/")
    app.add_url_rule("/go/<name>", endpoint="go", redirect_to=go)
    app.add_url_rule("/promo", endpoint="docs", redirect_to="https://partner.example/")  # @public docs' endpoint
    # not listed: judged by where they lead (strings), or as a view (callables)
    app.add_url_rule("/away-unlisted", endpoint="away_unlisted", redirect_to="https://elsewhere.example/")
    app.add_url_rule("/retired-unlisted", endpoint="retired_unlisted", redirect_to="/gone-for-good")
    app.add_url_rule("/old-docs", endpoint="old_docs", redirect_to="/docs/")
    app.add_url_rule("/u/<int:user_id>", endpoint="by_id", redirect_to=by_id)  # to a public page
    app.add_url_rule("/old-u", endpoint="old_u", redirect_to="/u/1")  # a string, then by_id
    app.add_url_rule("/old-go", endpoint="old_go", redirect_to="/go/there")  # a string, then a public callable


@pytest.fixture
def apps(sqlite_url: str) -> Iterator[tuple[Flask, Flask, Counter[str]]]:
    """The guarded app, the same routes on a bare Flask app (what Flask itself answers), and how often the
    app's redirect_to callables ran."""
    calls: Counter[str] = Counter()
    guarded = guarded_app(sqlite_url, LISTED, static_folder=None)
    add_routes(guarded, calls)
    bare = Flask(__name__, static_folder=None)
    add_routes(bare, calls)
    yield guarded, bare, calls
    clerk_state(guarded).close()


@pytest.mark.parametrize("path", ["/away", "/retired", "/old-admin-listed", "/go/home", "/promo"])
def test_a_public_redirect_to_rule_answers_wherever_it_leads(apps: tuple[Flask, Flask, Counter[str]],
                                                           path: str) -> None:
    """Fixed: a ``redirect_to`` rule listed in ``public_endpoints`` (or on a ``@public`` view's endpoint)
    that led off the app (another site, a path nothing here serves) answered 401 to the signed-out: it was
    judged by its target alone. Its own endpoint is public: Flask's redirect answers, wherever it leads."""
    guarded, bare, _ = apps
    flask_says = answer(bare, path)
    assert flask_says[0] == 308, flask_says
    assert answer(guarded, path) == flask_says
    assert answer(guarded, path, headers=bearer("garbage")) == flask_says  # as on any public page
    assert answer(guarded, path, headers=bearer(token("user_public"))) == flask_says


def test_where_a_public_redirect_leads_still_protects_itself(apps: tuple[Flask, Flask, Counter[str]]) -> None:
    """A public redirect into a protected page (or to a path nothing serves) is no way around the page's own
    protection: following it, the signed-out get the 401 of any unknown path."""
    guarded, _, _ = apps
    with guarded.test_client() as client:
        nowhere = client.get("/nowhere")
        for path, target in (("/old-admin-listed", "/admin/"), ("/retired", "/gone-for-good")):
            moved = client.get(path)
            assert (moved.status_code, moved.headers["Location"]) == (308, f"http://localhost{target}")
            followed = client.get(path, follow_redirects=True)
            assert (followed.status_code, followed.get_json()) == (401, nowhere.get_json())
            assert followed.get_json()["error"] == "token_missing"
        signed_in = client.get("/old-admin-listed", headers=bearer(token("user_in")), follow_redirects=True)
        assert (signed_in.status_code, signed_in.get_data(as_text=True)) == (200, "every customer")


@pytest.mark.parametrize("path", ["/away-unlisted", "/retired-unlisted", "/u/1", "/old-u"])
def test_an_unlisted_redirect_off_the_app_or_computed_tells_a_stranger_nothing(
        apps: tuple[Flask, Flask, Counter[str]], path: str) -> None:
    """Unlisted, a ``redirect_to`` string is judged by where it leads (off the app, to nothing: 401, as
    for the routing's own redirects). A ``redirect_to`` callable is judged as a view: ``/u/1`` leads to a public
    page, but its ``Location`` names what the app looked up (whose page id 1 is), so it answers 401 as an
    unknown path does, also at the end of a chain (``/old-u`` -> ``/u/1``). Signed in: Flask's redirect."""
    guarded, bare, _ = apps
    with guarded.test_client() as client:
        refused, nowhere = client.get(path), client.get("/nowhere")
        assert (refused.status_code, refused.get_json()) == (nowhere.status_code, nowhere.get_json())
        assert refused.status_code == 401 and "Location" not in refused.headers
        bad = client.get(path, headers=bearer("garbage"))
        assert (bad.status_code, bad.get_json()["error"]) == (401, "token_malformed")
    signed_in = answer(guarded, path, headers=bearer(token("user_redirected")))
    assert signed_in == answer(bare, path) and signed_in[0] == 308


@pytest.mark.parametrize(("path", "location"), [("/old-docs", "http://localhost/docs/"),
                                                ("/old-go", "http://localhost/go/there")])
def test_an_unlisted_redirect_to_string_leading_to_a_public_rule_is_flasks_own(
        apps: tuple[Flask, Flask, Counter[str]], path: str, location: str) -> None:
    """As before: an unlisted string redirect to a public page is Flask's 308, and so is one to a public
    ``redirect_to`` rule (the stranger may have that rule's redirect too)."""
    guarded, bare, _ = apps
    assert answer(guarded, path) == answer(bare, path) == (308, location)


def test_judging_a_redirect_never_runs_the_apps_redirect_to_callables(
        apps: tuple[Flask, Flask, Counter[str]]) -> None:
    """Werkzeug runs a ``redirect_to`` callable while routing, once per request whatever the extension does;
    judging a redirect (a chain through it included) runs none of the app's code again."""
    guarded, _, calls = apps
    client = guarded.test_client()  # not `with`: that routes each request once more, to keep its context
    for path, runs in (("/u/1", {"by_id": 1}), ("/old-u", {}), ("/go/x", {"go": 1}), ("/old-go", {})):
        calls.clear()
        assert client.get(path).status_code in (308, 401)
        assert calls == Counter(runs), path
    calls.clear()
    followed = client.get("/u/1", headers=bearer(token("user_slug")), follow_redirects=True)
    assert followed.get_data(as_text=True) == "profile of alice" and calls == Counter({"by_id": 1})


def test_redirect_to_rules_over_http(apps: tuple[Flask, Flask, Counter[str]]) -> None:
    guarded, _, _ = apps
    with running_wsgi(guarded) as url, httpx.Client(base_url=url) as http:
        away = http.get("/away")
        assert (away.status_code, away.headers["location"]) == (308, "https://elsewhere.example/landing")
        retired = http.get("/retired")
        assert (retired.status_code, retired.headers["location"]) == (308, f"{url}/gone-for-good")
        assert http.get("/retired", follow_redirects=True).status_code == 401
        assert http.get("/away-unlisted").status_code == 401
        computed = http.get("/u/1")
        assert computed.status_code == 401 and "location" not in computed.headers
        signed_in = http.get("/u/1", headers=bearer(token("user_http")), follow_redirects=True)
        assert (signed_in.status_code, signed_in.text) == (200, "profile of alice")


# -- the app's static endpoint ------------------------------------------------------------------------------------


def _private_files(filename: str) -> str:
    return f"private file {filename}: every customer"


def test_flasks_static_files_are_served_to_the_signed_out(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "site.css").write_text("/* site */")
    app = guarded_app(sqlite_url, static_folder=str(tmp_path / "static"))

    @app.get("/admin")
    def admin() -> str:
        return "every customer"

    with app.test_client() as client:
        served = client.get("/static/site.css")
        assert (served.status_code, served.get_data(as_text=True)) == (200, "/* site */")
        assert client.get("/static/missing.css").status_code == 404  # Flask's answer, not the extension's
        assert client.get("/admin").status_code == 401
    with running_wsgi(app) as url, httpx.Client(base_url=url) as http:
        assert (http.get("/static/site.css").status_code, http.get("/static/site.css").text) == (200, "/* site */")
    clerk_state(app).close()


def test_static_files_stay_public_when_flask_was_replaced_by_a_subclass(sqlite_url: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed: OpenTelemetry's Flask instrumentation sets ``flask.Flask`` to a subclass with an
    ``__init__`` of its own before the app (and this extension) is imported; Flask's static view was looked for
    in that ``__init__`` only, and every static file answered 401. The app's whole class chain is searched."""
    from clerk_sync.integrations.flask import _core

    class InstrumentedFlask(Flask):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_core, "Flask", InstrumentedFlask)  # as imported after the instrumentation ran
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "site.css").write_text("/* site */")
    app = InstrumentedFlask(__name__, static_folder=str(tmp_path / "static"))
    app.config["CLERK_SYNC"] = _config(sqlite_url)
    ClerkSync(app, deny_by_default=True, revocation_refresh_s=0)
    with app.test_client() as client:
        assert client.get("/static/site.css").status_code == 200
    clerk_state(app).close()


@pytest.mark.parametrize("public_endpoints", [frozenset(), frozenset({"home"})])
def test_an_apps_own_view_named_static_is_protected(sqlite_url: str,
                                                    public_endpoints: frozenset[str]) -> None:
    """Fixed: ``static`` was public by its name, so an app built with ``static_folder=None`` that names a
    view of its own ``static`` (or a route whose endpoint happens to be ``static``) had it open to strangers
    without asking. Only the view Flask registers for a ``static_folder`` is public by that name."""
    app = guarded_app(sqlite_url, public_endpoints, static_folder=None)
    app.add_url_rule("/files/<path:filename>", endpoint="static", view_func=_private_files)
    assert "static" in app.view_functions and not app.has_static_folder
    with app.test_client() as client:
        refused, nowhere = client.get("/files/report.csv"), client.get("/nowhere")
        assert (refused.status_code, refused.get_json()) == (401, nowhere.get_json())
        signed_in = client.get("/files/report.csv", headers=bearer(token("user_files")))
        assert (signed_in.status_code, signed_in.get_data(as_text=True)) == (
            200, "private file report.csv: every customer")
    with running_wsgi(app) as url, httpx.Client(base_url=url) as http:
        assert http.get("/files/report.csv").status_code == 401
    clerk_state(app).close()


def test_a_route_whose_endpoint_is_static_is_protected(sqlite_url: str) -> None:
    app = guarded_app(sqlite_url, static_folder=None)

    @app.get("/static-report", endpoint="static")
    def report() -> str:
        return "the static report: every customer"

    with app.test_client() as client:
        assert client.get("/static-report").status_code == 401
        assert client.get("/static-report", headers=bearer(token("user_report"))).status_code == 200
    clerk_state(app).close()


def test_a_static_folder_set_later_does_not_open_the_apps_own_static_view(sqlite_url: str, tmp_path: Path) -> None:
    """A folder assigned after Flask was built (``app.static_folder = ...``) registers no view: the app's own
    ``static`` stays its own, protected. So is a view the app put in Flask's place."""
    later = guarded_app(sqlite_url, static_folder=None)
    later.add_url_rule("/files/<path:filename>", endpoint="static", view_func=_private_files)
    later.static_folder = str(tmp_path)
    assert later.has_static_folder
    replaced = guarded_app(sqlite_url, static_folder=str(tmp_path), static_url_path="/static")
    replaced.view_functions["static"] = _private_files
    for app, path in ((later, "/files/a.csv"), (replaced, "/static/a.csv")):
        with app.test_client() as client:
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=bearer(token("user_later"))).get_data(as_text=True) == (
                "private file a.csv: every customer")
        clerk_state(app).close()


def test_an_apps_own_static_view_is_public_when_listed(sqlite_url: str) -> None:
    """Listing ``static`` opens whatever the app registered under it: the app asked."""
    app = guarded_app(sqlite_url, {"static"}, static_folder=None)
    app.add_url_rule("/files/<path:filename>", endpoint="static", view_func=_private_files)
    assert answer(app, "/files/a.csv")[0] == 200
    clerk_state(app).close()
