"""The server's edge: the Host check of a keyless loopback server, the browser pages' headers, and
/docs rendering from the package with no network (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from eztinker.server.guards import host_name


def test_host_names_are_read_without_their_port():
    assert host_name("Example.COM:80") == "example.com"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"


def test_a_keyless_server_answers_only_loopback_host_names(make_server):
    """DNS rebinding: a page on attacker.example whose name now resolves to 127.0.0.1 reaches the
    server, but its requests carry `Host: attacker.example`."""
    with make_server() as server:
        port = server.url.rsplit(":", 1)[1]
        for host, path in (
            (f"attacker.example:{port}", "/v1/runs"),
            ("localhost.attacker.example", "/health"),
            ("attacker.example", "/ui/"),
            ("10.0.0.1", "/v1/models"),
        ):
            response = httpx.get(server.url + path, headers={"Host": host})
            assert response.status_code == 403, (host, path, response.status_code)
            assert "not allowed" in response.text and "--allowed-hosts" in response.text
        # OpenAI's paths answer in OpenAI's error shape.
        body = httpx.post(server.url + "/v1/chat/completions", headers={"Host": "attacker.example"}, json={}).json()
        assert body["error"]["type"] == "invalid_request_error" and "not allowed" in body["error"]["message"]
        for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
            assert httpx.get(server.url + "/v1/runs", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_are_answered_too_and_a_keyed_server_needs_no_host_check(make_server, tmp_path):
    with make_server(allowed_hosts=["eztinker.lan"]) as server:
        assert httpx.get(server.url + "/v1/runs", headers={"Host": "eztinker.lan:8000"}).status_code == 200
        assert httpx.get(server.url + "/v1/runs", headers={"Host": "other.lan"}).status_code == 403
    with make_server(data_dir=tmp_path / "keyed", api_key="s3cret") as server:  # the key protects it
        headers = {"Host": "attacker.example", "Authorization": "Bearer s3cret"}
        assert httpx.get(server.url + "/v1/runs", headers=headers).status_code == 200


def test_browser_pages_send_a_csp_and_frame_protection(make_server):
    with make_server() as server:
        for path in ("/ui/", "/docs", "/ui/static/app.js"):
            response = httpx.get(server.url + path)
            assert response.status_code == 200, path
            csp = response.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
            assert "unsafe-inline" not in csp and "http" not in csp, path  # no inline script, no other origin
            assert response.headers["x-frame-options"] == "DENY", path
        # The API's own answers are never to be framed either.
        assert httpx.get(server.url + "/v1/runs").headers["x-frame-options"] == "DENY"
        page = httpx.get(server.url + "/docs").text
        assert "<script>" not in page and "cdn" not in page.lower()  # no inline script, nothing from a CDN
        assert httpx.get(server.url + "/redoc").status_code == 404  # FastAPI's CDN-loaded ReDoc is off


def test_docs_render_offline_under_the_csp_in_chromium(make_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from test_dashboard import chromium_executable

    with make_server() as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            elsewhere, problems = [], []

            def only_this_server(route):
                if route.request.url.startswith(server.url):
                    route.continue_()
                else:  # offline: anything from another origin would fail here
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", only_this_server)
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.goto(server.url + "/docs")
            expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
            expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first).to_be_visible()
            shots = Path(os.environ.get("EZTINKER_SCREENSHOTS") or tmp_path)
            page.screenshot(path=str(shots / "api-docs.png"))
            assert elsewhere == [] and problems == [], (elsewhere, problems)
        finally:
            browser.close()
