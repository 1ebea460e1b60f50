"""One canonical path for routing, metering and the upstream (sidecar/paths.py), and the proxy
acting on it: the path the upstream serves is the path that was routed and metered."""

from __future__ import annotations

import asyncio
import posixpath

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Route, Settings
from sidecar.paths import PathError, canonicalize, remove_dot_segments
from sidecar.routing import targets

from .conftest import Script, StackFactory, chat_chunks


@pytest.mark.parametrize(("raw", "canonical"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/./chat//completions", "/v1/chat/completions"),
    ("/api/chat/../../v1/chat/completions", "/v1/chat/completions"),
    ("/openai/%2e%2e/x", "/x"),
    ("/openai/%2E%2e/x", "/x"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a//b/", "/a/b/"),
    ("/%7euser/%41bc", "/~user/Abc"),
    ("/x/%c3%a9", "/x/%C3%A9"),  # not unreserved: stays encoded, hex upper-cased
    ("/x?y", "/x?y"),  # canonicalize() gets the path without the query: '?' is just a char
])
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert canonicalize(raw).path == canonical


@pytest.mark.parametrize("raw", ["/x/%2Fy", "/x/%2fy", "/x/%5Cy", "/x/%00", "/a\\b", "/..",
                                 "/a/../../b", "relative"])
def test_rejected_paths(raw: str) -> None:
    with pytest.raises(PathError):
        canonicalize(raw)


def test_keep_passes_escaped_slashes_through() -> None:
    assert canonicalize("/x/%2Fy/./z", "keep").path == "/x/%2Fy/z"
    assert canonicalize("/a\\b", "keep").path == "/a\\b"


def test_rfc3986_examples() -> None:
    """RFC 3986 section 5.2.4's own examples (on absolute paths)."""
    assert remove_dot_segments("/a/b/c/./../../g")[0] == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6")[0] == "/mid/6"


SEGMENT = st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "c.d", "%41"])


@given(st.lists(SEGMENT, max_size=8))
@settings(max_examples=500, deadline=None)
def test_canonical_paths_are_stable_and_match_a_normalizing_server(segments: list[str]) -> None:
    raw = "/" + "/".join(segments)
    try:
        c = canonicalize(raw)
    except PathError:
        return
    assert canonicalize(c.path).path == c.path  # idempotent
    assert "//" not in c.path and "/./" not in c.path + "/" and "/../" not in c.path + "/"
    # What a server that decodes and normalizes (posixpath, as nginx and most frameworks do)
    # would serve is exactly the canonical path.
    decoded = raw.replace("%2e", ".").replace("%2E", ".").replace("%41", "A")
    served = posixpath.normpath(decoded)
    assert posixpath.normpath(c.path) == (served if not served.startswith("//") else served[1:])


# -- through the proxy ---------------------------------------------------------------------------


async def _raw_request(port: int, path: str, body: bytes = b"{}",
                       headers: str = "") -> tuple[int, bytes]:
    """A request with the path exactly as written (HTTP clients normalize paths themselves)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode()
                 + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def test_dot_segments_never_move_a_request_between_routes(
        stack_factory: StackFactory) -> None:
    stack = await stack_factory()
    other = await stack_factory()
    # Routes /openai -> this stack's upstream, /other -> the other's.
    stack.apps.handler.targets[:] = targets(Settings(routes=(
        Route("/openai", stack.upstream.url), Route("/other", other.upstream.url))))
    port = stack.running.proxy_port
    for path in ("/openai/../other/x", "/openai/%2e%2e/x", "/other/../openai/v1/chat/completions",
                 "/openai/..", "/openai/v1/%2Fchat"):
        status, body = await _raw_request(port, path)
        assert status == 400, path
        assert orjson.loads(body)["error"]["type"] == "invalid_request"
    assert stack.upstream.requests == [] and other.upstream.requests == []


async def test_the_upstream_serves_the_path_that_was_metered(stack_factory: StackFactory) -> None:
    stack = await stack_factory()
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hello there", 3, usage={
        "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})]))
    status, _ = await _raw_request(
        stack.running.proxy_port, "/api/chat/../../v1/./chat//completions?x=1",
        b'{"model": "gpt-4o-mini", "stream": true}', f"X-Script: {sid}\r\n")
    assert status == 200
    served = stack.upstream.requests[-1]["path"]
    assert served == "/v1/chat/completions?x=1"
    rec = await stack.wait_record()
    # Classified as OpenAI chat (the path served), not Ollama (the path as sent).
    assert rec["path"] == "/v1/chat/completions" and rec["output_source"] == "reported"
    assert rec["provider"] == "openai"


async def test_escaped_slashes_can_be_kept(stack_factory: StackFactory) -> None:
    stack = await stack_factory(escaped_slashes="keep")
    sid = stack.upstream.add(Script(chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    status, _ = await _raw_request(stack.running.proxy_port, "/v1/files/a%2Fb/./content",
                                   headers=f"X-Script: {sid}\r\n")
    assert status == 200
    assert stack.upstream.requests[-1]["path"] == "/v1/files/a%2Fb/content"
