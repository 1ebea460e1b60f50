"""include_usage injection: the request change and the filter that hides the extra chunk."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.usage_inject import UsageChunkFilter, inject

from .conftest import chat_chunks, split_at


def test_inject_only_when_needed() -> None:
    assert inject({"stream": True, "messages": []}) is not None
    new = orjson.loads(inject({"stream": True, "messages": [],
                               "stream_options": {"foo": 1}}) or b"")
    assert new["stream_options"] == {"foo": 1, "include_usage": True}
    assert inject({"stream": False, "messages": []}) is None
    assert inject({"stream": True, "messages": [],
                   "stream_options": {"include_usage": True}}) is None
    assert inject({"stream": True, "input": "embeddings?"}) is None


@given(cuts=st.lists(st.integers(0, 3000), max_size=30))
@settings(max_examples=100, deadline=None)
def test_filter_removes_exactly_the_usage_chunk(cuts: list[int]) -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    with_usage = chat_chunks("some text to stream " * 5, 4, usage=usage)
    f = UsageChunkFilter()
    out = b"".join(f.feed(p) for p in split_at(with_usage, cuts)) + f.close()
    assert out == chat_chunks("some text to stream " * 5, 4)
    assert f.removed == 1
