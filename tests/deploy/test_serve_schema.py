"""HTTP conformance of `ctxsim serve`: its OpenAPI schema says what it does, checked by Schemathesis for real.

A real uvicorn server on a free loopback port serves a tiny index; Schemathesis's CLI runs every check
(``--checks all``: status codes, content types, response schemas, headers, negative/positive data, unsupported
methods, auth) against it with a fixed number of examples per operation and a fixed seed, once without a token
and once with one. Uploads that the schema calls valid are real images (tests/deploy/schemathesis_hooks.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serve_helpers import png, running, tiny_index  # noqa: E402

TOKEN = "schema-token"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
EXAMPLES = 20  # per operation and phase; about 120 requests a run, a few seconds


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, other_run_dir):
    return tiny_index(tmp_path_factory.mktemp("schema"), other_run_dir)


def _app(index_dir, token=None):
    from ctxsim.deploy import create_app

    return create_app(index_dir, token=token, max_batch=8, batch_wait_ms=2, reload_every_s=0, device="cpu")


def test_openapi_schema_says_what_the_server_does(index_dir):
    with running(_app(index_dir, TOKEN)) as url:
        assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 401
        schema = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    paths = schema["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for path in ("/search", "/embed"):
        op = paths[path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        ref = body["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
        form = schema["components"]["schemas"][ref]
        assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
        for status in ("400", "401", "413", "415", "422", "500"):
            assert list(op["responses"][status]["content"]) == ["application/json"], (path, status)
        assert "`file`" in op["description"]  # the legacy alias is documented
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert paths["/healthz"]["get"]["security"] == []


def test_405_names_the_allowed_methods(index_dir):
    with running(_app(index_dir)) as url:
        for method, path, allowed in (("PUT", "/search", "POST"), ("TRACE", "/embed", "POST"),
                                      ("POST", "/info", "GET"), ("DELETE", "/metrics", "GET")):
            r = httpx.request(method, f"{url}{path}", timeout=10)
            assert r.status_code == 405 and r.json()["error"], (method, path)
            assert allowed in r.headers["allow"], (method, path, r.headers)
        r = httpx.post(f"{url}/embed", content=b"garbage", timeout=10,
                       headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"  # documented now
        assert r.json() == {"error": "Invalid multipart data."}
        r = httpx.post(f"{url}/embed", files={"file": ("a.png", png(20, 20), "image/png")}, timeout=30)
        assert r.status_code == 200, r.text  # the legacy field name still works
        r = httpx.post(f"{url}/embed", files={"image": ("a.png", png(20, 20), "image/png"),
                                              "file": ("b.png", png(20, 20), "image/png")}, timeout=30)
        assert r.status_code == 422 and "not both" in r.json()["error"]


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_schemathesis_finds_nothing(index_dir, token, tmp_path):
    pytest.importorskip("schemathesis", reason="the conformance run needs schemathesis (pip install 'ctxsim[dev]')")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", "--checks", "all", "--max-examples", str(EXAMPLES),
           "--seed", "1", "--workers", "1", "--no-color", "--generation-database", "none", "--request-timeout", "30"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}
    with running(_app(index_dir, token)) as url:
        r = subprocess.run([*cmd, f"{url}/openapi.json"], capture_output=True, text=True, timeout=180, env=env,
                           cwd=tmp_path)  # reports and caches, if any, go to tmp_path
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 5 * EXAMPLES, out[-3000:]
    assert "Operations:       9 selected / 9 total" in out and "Tested: 9" in out, out[-3000:]
