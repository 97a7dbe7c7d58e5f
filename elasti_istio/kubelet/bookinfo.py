"""Small stand-ins for Istio's Bookinfo services, chosen by the container image (``examples-bookinfo-<svc>-v<N>``).

They answer like the real ones (same paths, same JSON shapes, same error texts) so that the real
manifests and VirtualServices from ``examples/bookinfo`` behave as in a real mesh: productpage renders
a page from details and reviews, reviews v2 and v3 ask ratings for stars (black and red), v1 does not.
Every call to another service goes through the mesh's outbound proxy, as a sidecar would carry it,
and leaves from the pod's own address so that the mesh knows the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from elasti_istio.kubelet.apps import Caller, PodIdentity, track_inflight

IMAGE = re.compile(r"examples-bookinfo-(productpage|details|reviews|ratings)-v(\d+)")

# Headers the real services pass along (tracing, the request id, the logged-in user).
FORWARDED = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-cloud-trace-context",
    "end-user",
    "user-agent",
)

DETAILS_ERROR = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Sorry, product reviews are currently unavailable for this book."
RATINGS_ERROR = "Ratings service is currently unavailable"
REVIEW_TEXTS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
)
PRODUCT = {
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
    "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his "
    "most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in "
    "addition to puns and word play.",
}


def bookinfo_kind(image: str) -> tuple[str, int] | None:
    m = IMAGE.search(image or "")
    return (m.group(1), int(m.group(2))) if m else None


@dataclasses.dataclass
class Upstreams:
    """Where a Bookinfo service finds the others: the real images' environment variables, same defaults."""

    env: Mapping[str, str]

    def url(self, service: str) -> str:
        domain = self.env.get("SERVICES_DOMAIN")
        host = self.env.get(f"{service.upper()}_HOSTNAME") or service
        port = self.env.get(f"{service.upper()}_SERVICE_PORT") or "9080"
        return f"http://{host}{'.' + domain if domain else ''}:{port}"


def forwarded_headers(request: web.Request) -> dict[str, str]:
    out = {k: request.headers[k] for k in FORWARDED if k in request.headers}
    user = request.cookies.get("user")
    if user:
        out["end-user"] = user
    return out


def _pod_headers(ident: PodIdentity) -> dict[str, str]:
    return {"x-pod-name": ident.name, "x-pod-namespace": ident.namespace, "x-pod-ip": ident.ip}


def _json(data: Any, ident: PodIdentity, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=_pod_headers(ident))


def _product_id(request: web.Request) -> int | None:
    try:
        return int(request.match_info["id"])
    except (KeyError, ValueError):
        return None


def _base(ident: PodIdentity, healthy_text: str) -> web.Application:
    app = web.Application(middlewares=[track_inflight])
    app["pod"] = ident
    app["inflight"] = [0]

    async def health(request: web.Request) -> web.Response:
        return web.Response(text=healthy_text, headers=_pod_headers(ident))

    app.router.add_get("/health", health)
    return app


# ---- details ---------------------------------------------------------------------------------------


def details_app(ident: PodIdentity) -> web.Application:
    app = _base(ident, '{"status": "Details is healthy"}')

    async def details(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product id"}, ident, 400)
        return _json(
            {
                "id": pid,
                "author": "William Shakespeare",
                "year": 1595,
                "type": "paperback",
                "pages": 200,
                "publisher": "PublisherA",
                "language": "English",
                "ISBN-10": "1234567890",
                "ISBN-13": "123-1234567890",
            },
            ident,
        )

    app.router.add_get("/details/{id}", details)
    return app


# ---- ratings ---------------------------------------------------------------------------------------


def ratings_app(ident: PodIdentity) -> web.Application:
    app = _base(ident, '{"status": "Ratings is healthy"}')

    async def ratings(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product ID"}, ident, 400)
        return _json({"id": pid, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}, ident)

    app.router.add_get("/ratings/{id}", ratings)
    return app


# ---- reviews ---------------------------------------------------------------------------------------


def reviews_app(ident: PodIdentity, version: int, env: Mapping[str, str], caller: Caller) -> web.Application:
    app = _base(ident, '{"status": "Reviews is healthy"}')
    with_ratings = version >= 2 and env.get("ENABLE_RATINGS", "true").lower() != "false"
    color = env.get("STAR_COLOR") or ("red" if version >= 3 else "black")
    ratings_url = Upstreams(env).url("ratings")

    async def reviews(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product id"}, ident, 400)
        stars: dict[str, Any] | None = None
        if with_ratings:
            status, doc = await caller.get_json(f"{ratings_url}/ratings/{pid}", forwarded_headers(request))
            stars = (doc or {}).get("ratings") if status == 200 and isinstance(doc, dict) else None
        out = []
        for reviewer, text in REVIEW_TEXTS:
            item: dict[str, Any] = {"reviewer": reviewer, "text": text}
            if with_ratings:
                if stars is None:
                    item["rating"] = {"error": RATINGS_ERROR}
                else:
                    item["rating"] = {"stars": int(stars.get(reviewer, 0)), "color": color}
            out.append(item)
        return _json({"id": str(pid), "podname": ident.name, "clustername": "null", "reviews": out}, ident)

    app.router.add_get("/reviews/{id}", reviews)
    app.on_cleanup.append(lambda _app: caller.close())
    return app


# ---- productpage -----------------------------------------------------------------------------------


def _stars(rating: Mapping[str, Any]) -> str:
    if "error" in rating:
        return f'<p class="rating-error"><i>{html.escape(str(rating["error"]))}</i></p>'
    n = int(rating.get("stars", 0))
    color = html.escape(str(rating.get("color", "black")))
    full = "".join(f'<span class="star star-{color}" style="color:{color}">&#9733;</span>' for _ in range(n))
    empty = "".join('<span class="star star-empty">&#9734;</span>' for _ in range(5 - n))
    return f'<p class="rating" data-stars="{n}" data-color="{color}">{full}{empty}</p>'


def render_page(user: str | None, details: Mapping[str, Any], reviews: Mapping[str, Any]) -> str:
    e = html.escape
    if "error" in details:
        details_html = (
            f'<div class="details-error"><h4>Error fetching product details!</h4><p>{e(details["error"])}</p></div>'
        )
    else:
        rows = "".join(
            f"<dt>{e(label)}:</dt><dd>{e(str(details.get(key, '')))}</dd>"
            for label, key in (
                ("Type", "type"),
                ("Pages", "pages"),
                ("Publisher", "publisher"),
                ("Language", "language"),
                ("ISBN-10", "ISBN-10"),
                ("ISBN-13", "ISBN-13"),
            )
        )
        details_html = f'<div class="details"><h4>Book Details</h4><dl>{rows}</dl></div>'
    if "error" in reviews:
        reviews_html = (
            f'<div class="reviews-error"><h4>Error fetching product reviews!</h4><p>{e(reviews["error"])}</p></div>'
        )
    else:
        items = []
        for r in reviews.get("reviews") or []:
            rating = _stars(r["rating"]) if "rating" in r else ""
            text, reviewer = e(str(r.get("text", ""))), e(str(r.get("reviewer", "")))
            items.append(f"<blockquote><p>{text}</p><small>{reviewer}</small>{rating}</blockquote>")
        reviews_html = (
            f'<div class="reviews"><h4>Book Reviews</h4>{"".join(items)}'
            "<dl><dt>Reviews served by:</dt>"
            f'<dd class="reviews-pod">{e(str(reviews.get("podname", "")))}</dd></dl></div>'
        )
    who = f'<p class="user">signed in as {e(user)}</p>' if user else '<p class="user">not signed in</p>'
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Simple Bookstore App</title></head><body>'
        f'<nav><a href="/productpage">BookInfo Sample</a>{who}</nav>'
        f'<h3 class="title">{e(PRODUCT["title"])}</h3><p class="summary">{PRODUCT["descriptionHtml"]}</p>'
        f"{details_html}{reviews_html}</body></html>"
    )


def productpage_app(ident: PodIdentity, env: Mapping[str, str], caller: Caller) -> web.Application:
    app = _base(ident, "Product page is healthy")
    up = Upstreams(env)

    async def fetch(service: str, path: str, error: str, headers: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
        """``(status, document, why)``: on failure the document is the real service's error text and
        ``why`` says what the call got (status and the start of the body), for the degraded-page header."""
        status, _h, body = await caller.call("GET", f"{up.url(service)}{path}", headers)
        if status == 200:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                return 200, doc, ""
        why = f"{service}: {status or 'no answer'} {body[:120].decode(errors='replace')}".strip()
        return status or 503, {"error": error}, " ".join(why.split())

    async def fetch_details(pid: int, headers: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
        return await fetch("details", f"/details/{pid}", DETAILS_ERROR, headers)

    async def fetch_reviews(pid: int, headers: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
        return await fetch("reviews", f"/reviews/{pid}", REVIEWS_ERROR, headers)

    async def fetch_ratings(pid: int, headers: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
        return await fetch("ratings", f"/ratings/{pid}", RATINGS_ERROR, headers)

    async def productpage(request: web.Request) -> web.Response:
        headers = forwarded_headers(request)
        (ds, details, dwhy), (rs, reviews, rwhy) = await asyncio.gather(
            fetch_details(0, headers), fetch_reviews(0, headers)
        )
        page = render_page(request.cookies.get("user"), details, reviews)
        degraded = [name for name, s in (("details", ds), ("reviews", rs)) if s != 200]
        h = _pod_headers(ident)
        if degraded:
            h["x-bookinfo-degraded"] = ",".join(degraded)
            h["x-bookinfo-degraded-why"] = "; ".join(w for w in (dwhy, rwhy) if w)
        return web.Response(text=page, content_type="text/html", headers=h)

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text='<html><body><a href="/productpage?u=normal">Normal user</a> '
            '<a href="/productpage?u=test">Test user</a></body></html>',
            content_type="text/html",
            headers=_pod_headers(ident),
        )

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        user = str(form.get("username") or "")
        resp = web.HTTPFound("/productpage", headers=_pod_headers(ident))
        if user:
            resp.set_cookie("user", user, path="/")
        raise resp

    async def logout(request: web.Request) -> web.Response:
        resp = web.HTTPFound("/productpage", headers=_pod_headers(ident))
        resp.del_cookie("user", path="/")
        raise resp

    async def products(request: web.Request) -> web.Response:
        return _json([PRODUCT], ident)

    async def product(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product id"}, ident, 400)
        status, doc, _why = await fetch_details(pid, forwarded_headers(request))
        return _json(doc, ident, status)

    async def product_reviews(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product id"}, ident, 400)
        status, doc, _why = await fetch_reviews(pid, forwarded_headers(request))
        return _json(doc, ident, status)

    async def product_ratings(request: web.Request) -> web.Response:
        pid = _product_id(request)
        if pid is None:
            return _json({"error": "please provide numeric product id"}, ident, 400)
        status, doc, _why = await fetch_ratings(pid, forwarded_headers(request))
        return _json(doc, ident, status)

    async def static(request: web.Request) -> web.Response:
        return web.Response(text="/* bookinfo static */\n", content_type="text/css", headers=_pod_headers(ident))

    r = app.router
    r.add_get("/", index)
    r.add_get("/productpage", productpage)
    r.add_post("/login", login)
    r.add_get("/logout", logout)
    r.add_get("/api/v1/products", products)
    r.add_get("/api/v1/products/{id}", product)
    r.add_get("/api/v1/products/{id}/reviews", product_reviews)
    r.add_get("/api/v1/products/{id}/ratings", product_ratings)
    r.add_get("/static/{tail:.*}", static)
    app.on_cleanup.append(lambda _app: caller.close())
    return app


def bookinfo_app(
    kind: tuple[str, int], ident: PodIdentity, env: Mapping[str, str], sidecar: str | None, timeout: float
) -> web.Application:
    service, version = kind
    if service == "details":
        return details_app(ident)
    if service == "ratings":
        return ratings_app(ident)
    caller = Caller(ident, sidecar, timeout)
    if service == "reviews":
        return reviews_app(ident, version, env, caller)
    return productpage_app(ident, env, caller)
