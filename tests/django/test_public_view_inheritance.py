"""Django (review): ``@clerk_public`` on a class-based view or a DRF view opens that class only. Read through
inheritance, a protected page built on a public one's code (``class AccountSettings(Landing)``) was served
without a session under ``REQUIRE_AUTH``; so was one whose base put the mark on ``dispatch`` with
``method_decorator`` (``as_view`` copies dispatch's attributes)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from clerk_sync.integrations.django.middleware import clerk_public
from tests.django.conftest import bearer, world_for


@clerk_public
class Landing(View):
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"page": "landing"})


class AccountSettings(Landing):  # reuses the landing page's code; never marked public
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"page": "settings", "secret": True})


@clerk_public
class Catalog(APIView):
    permission_classes = (AllowAny,)  # (Orders inherits it: only REQUIRE_AUTH protects it)

    def get(self, request: Any) -> Response:
        return Response({"page": "catalog"})


class Orders(Catalog):
    def get(self, request: Any) -> Response:
        return Response({"orders": ["secret"]})


@clerk_public
class Pricing(Landing):  # a subclass marked itself: public
    pass


@method_decorator(clerk_public, name="dispatch")  # Django's way to put a function decorator on a class
class About(View):
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"page": "about"})


class Team(About):  # inherits the marked dispatch; never marked itself
    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"page": "team", "secret": True})


@method_decorator(clerk_public, name="dispatch")
class Careers(About):  # marked itself
    pass


urlpatterns = [path("landing", Landing.as_view()), path("account/settings", AccountSettings.as_view()),
               path("catalog", Catalog.as_view()), path("orders", Orders.as_view()),
               path("pricing", Pricing.as_view()), path("about", About.as_view()), path("team", Team.as_view()),
               path("careers", Careers.as_view()), path("wrapped", clerk_public(AccountSettings.as_view()))]


def test_a_subclass_of_a_public_view_stays_protected(db_url: str) -> None:
    with world_for(db_url, "test-client") as world, override_settings(ROOT_URLCONF=__name__):
        for public in ("/landing", "/catalog", "/pricing", "/about", "/careers", "/wrapped"):
            assert world.app.get(public).status_code == 200, public
        for protected in ("/account/settings", "/orders", "/team"):
            refused = world.app.get(protected)
            assert (refused.status_code, refused.json()["error"]) == (401, "token_missing"), protected
        user = world.clerk.create_user("sub@example.com")
        token = world.clerk.mint_session_token(user["id"])
        assert world.app.get("/account/settings", headers=bearer(token)).json() == {"page": "settings",
                                                                                   "secret": True}
