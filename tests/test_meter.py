"""The per-request meter, sans-IO: decoding its own copy, settling reported over estimated."""

from __future__ import annotations

import gzip
import itertools
import zlib

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dialects.base import RequestInfo
from sidecar.dialects.openai import OpenAIDialect
from sidecar.meter import Meter
from sidecar.tokens import Tokenizers

from .conftest import chat_chunks, sse

_TOK = Tokenizers()
TEXT = "Reported usage wins; the estimate stands only when nothing was reported. 计费。" * 3


def make(model: str = "gpt-4o-mini", ct: str = "text/event-stream",
         ce: str | None = None) -> Meter:
    clock = itertools.count(1.0).__next__
    m = Meter(OpenAIDialect(), RequestInfo(model=model, stream=True,
                                           body={"messages": [{"role": "user", "content": "x"}]}),
              _TOK.for_model(model), lambda: float(clock()))
    m.start_response(ct, ce)
    return m


def run(m: Meter, data: bytes, size: int = 0) -> int:
    live = 0
    for i in range(0, len(data), size or len(data) or 1):
        m.feed(data[i:i + (size or len(data))])
        live += m.take_live()
    m.end_of_body()
    return live + m.take_live()


def test_reported_usage_wins_and_estimate_is_kept_alongside() -> None:
    m = make()
    m.estimate_prompt()
    live = run(m, chat_chunks(TEXT, 4, usage={"prompt_tokens": 50, "completion_tokens": 60}))
    s = m.settle()
    assert (s.input_tokens, s.output_tokens, s.source) == (50, 60, "reported")
    assert s.estimated_output_tokens == live == _TOK.for_model("gpt-4o-mini").count(TEXT)
    assert s.estimated_input_tokens == m.prompt_estimate > 0
    assert s.first_token_at is not None and s.finish_reason == "stop"


def test_estimate_stands_without_usage_and_source_says_so() -> None:
    m = make()
    run(m, chat_chunks(TEXT, 3))
    s = m.settle()
    assert s.output_source == "estimated" and s.input_source == "estimated"
    assert s.output_tokens == _TOK.for_model("gpt-4o-mini").count(TEXT)
    assert s.reasoning_tokens is None and s.cached_input_tokens is None


def test_mixed_source_when_only_input_is_reported() -> None:
    m = make()
    run(m, chat_chunks(TEXT, 3, usage={"prompt_tokens": 9}))
    assert m.settle().source == "mixed"


def test_reasoning_estimated_as_subset_of_output() -> None:
    m = make()
    run(m, sse({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm let me think"}}]},
               {"choices": [{"index": 0, "delta": {"content": "answer"}}]}))
    s = m.settle()
    tok = _TOK.for_model("gpt-4o-mini")
    assert s.reasoning_tokens == tok.count("hmm let me think")
    assert s.output_tokens == tok.count("hmm let me think") + tok.count("answer")


def test_gzip_and_deflate_copies_are_decoded() -> None:
    body = chat_chunks(TEXT, 5, usage={"prompt_tokens": 1, "completion_tokens": 2})
    for enc, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        m = make(ce=enc)
        run(m, packed, size=7)
        assert m.settle().output_tokens == 2 and m.frame_errors == 0


def test_unknown_encoding_and_corrupt_gzip_are_counted_not_raised() -> None:
    m = make(ce="br")
    run(m, b"\x00\x01garbage")
    assert m.frame_errors == 1 and m.settle().output_source == "estimated"
    m = make(ce="gzip")
    run(m, b"not gzip at all")
    assert m.frame_errors == 1


def test_non_streamed_json_body() -> None:
    m = make(ct="application/json")
    body = orjson.dumps({"choices": [{"index": 0, "message": {"content": TEXT}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    run(m, body, size=10)
    s = m.settle()
    assert not m.streamed and (s.input_tokens, s.output_tokens) == (3, 4)
    m = make(ct="application/json")
    run(m, b"<html>bad gateway</html>")
    assert m.frame_errors == 1


@given(cuts=st.lists(st.integers(0, 5000), max_size=40), size=st.sampled_from([1, 3, 11]))
@settings(max_examples=60, deadline=None)
def test_rechunking_never_changes_accounting(cuts: list[int], size: int) -> None:
    body = chat_chunks(TEXT, size)
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    m = make()
    live = 0
    for a, b in itertools.pairwise(points):
        m.feed(body[a:b])
        live += m.take_live()
    m.end_of_body()
    live += m.take_live()
    expect = _TOK.for_model("gpt-4o-mini").count(TEXT)
    assert live == expect and m.settle().output_tokens == expect


def test_large_texts_are_estimated_once_the_tokenizer_budget_is_spent() -> None:
    from sidecar.tokens import CountBudget

    now = [0.0]
    budget = CountBudget(0.001, clock=lambda: now[0])
    budget.spend(1.0)  # spent
    tok = Tokenizers().for_model("gpt-4o-mini")
    text = "tool arguments with many words in them " * 100
    body = sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text}}]})
    exact = Meter(OpenAIDialect(), RequestInfo(model="gpt-4o-mini", stream=True), tok,
                  lambda: 0.0)
    sampled = Meter(OpenAIDialect(), RequestInfo(model="gpt-4o-mini", stream=True), tok,
                    lambda: 0.0, budget=budget)
    for m in (exact, sampled):
        m.start_response("text/event-stream", None)
        m.feed(body)
        m.end_of_body()
    assert exact.estimated_chars == 0 and sampled.estimated_chars == len(text)
    # The ratio of a counted sample of the text: close to the exact count.
    e, s = exact.settle().output_tokens, sampled.settle().output_tokens
    assert abs(s - e) / e < 0.05, (s, e)
    short = Meter(OpenAIDialect(), RequestInfo(model="gpt-4o-mini", stream=True), tok,
                  lambda: 0.0, budget=budget)
    short.start_response("text/event-stream", None)
    short.feed(sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "hi"}}]}))
    short.end_of_body()
    assert short.estimated_chars == 0  # small texts are always counted exactly


@given(sizes=st.lists(st.integers(1, 20000), min_size=1, max_size=12),
       defer=st.sampled_from([1, 40, 300, 5000]), deferred_in_thread=st.booleans(),
       whole=st.booleans())
@settings(max_examples=150, deadline=None)
def test_deferred_large_counts_settle_and_go_live_as_if_counted_in_feed(
        sizes: list[int], defer: int, deferred_in_thread: bool, whole: bool) -> None:
    """The proxy counts a slot's large texts of a read in a worker (count_deferred) after the
    loop read it: same live totals read for read once counted, same settlement, in order."""
    import threading

    text = ("Deferred counts keep their order; tool args {\"path\": \"a/b.py\", \"n\": 1}. " * 80
            + "计费。" * 30)
    body = chat_chunks(text, 37) + sse(
        {"model": "gpt-4o-mini", "choices": [{"index": 1, "delta": {"content": text[:500]}}]},
        done=True)
    if whole:
        sizes = [len(body)]
    plain, deferring = make(), make()
    deferring.defer_chars = defer
    pos, i, seen_deferred = 0, 0, False
    while pos < len(body):
        chunk = body[pos:pos + sizes[i % len(sizes)]]
        pos, i = pos + len(chunk), i + 1
        plain.feed(chunk)
        deferring.feed(chunk)
        if deferring.deferred:
            seen_deferred = True
            if deferred_in_thread:
                t = threading.Thread(target=deferring.count_deferred)
                t.start()
                t.join()
            else:
                deferring.count_deferred()
        assert not deferring.deferred
        assert deferring.take_live() == plain.take_live()
    plain.end_of_body()
    deferring.end_of_body()
    assert deferring.take_live() == plain.take_live()
    assert deferring.settle() == plain.settle()
    assert seen_deferred or not whole  # one read of it all holds 6,000+ characters of text


def test_end_of_body_counts_what_is_still_deferred() -> None:
    text = "a long tool argument, counted after the read " * 50
    m = make()
    m.defer_chars = 100
    m.feed(chat_chunks(text, len(text)))
    assert m.deferred and m.take_live() == 0
    m.end_of_body()
    assert not m.deferred
    assert m.settle().output_tokens == _TOK.for_model("gpt-4o-mini").count(text)


def test_texts_after_a_deferred_one_wait_behind_it() -> None:
    """Until count_deferred() runs, later texts queue behind a deferred one (a counter must see
    its text in order), even small ones."""
    first = "a long tool argument, counted after the read " * 50
    second = "and then a shorter one that would be counted at once. " * 9
    plain, deferring = make(), make()
    deferring.defer_chars = 100
    for m in (plain, deferring):
        m.feed(chat_chunks(first, len(first)).removesuffix(b"data: [DONE]\n\n"))
    plain_live = plain.take_live()
    assert deferring.take_live() == 0
    event = sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {
        "content": second}}]}, done=False)
    plain.feed(event)
    deferring.feed(event)
    assert deferring.deferred and deferring.take_live() == 0
    deferring.count_deferred()
    assert deferring.take_live() == plain_live + plain.take_live() > 0
    plain.end_of_body()
    deferring.end_of_body()
    assert deferring.settle() == plain.settle()


def test_a_text_queued_behind_a_deferred_one_still_asks_the_budget() -> None:
    """Two slots' large texts in one read, the first deferred: once the first has spent the
    budget, the second is counted by length, as it would have been without deferring."""
    from sidecar.tokens import CountBudget

    text = "tool arguments with many words in them, counted exactly while allowed " * 3000
    body = sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text}},
                                                    {"index": 1, "delta": {"content": text}}]})
    results = []
    for defer in (None, 1024):
        budget = CountBudget(0.001, clock=lambda: 0.0)  # a stopped clock: no refill
        budget.spend(budget.capacity - 1e-6)  # enough left to allow one count, not two
        m = Meter(OpenAIDialect(), RequestInfo(model="gpt-4o-mini", stream=True),
                  _TOK.for_model("gpt-4o-mini"), lambda: 0.0, budget=budget)
        m.defer_chars = defer
        m.start_response("text/event-stream", None)
        m.feed(body)
        m.count_deferred()
        m.end_of_body()
        results.append((m.estimated_chars, m.settle()))
    assert results[0][0] == len(text)  # the first spent the budget, the second estimated
    assert results[1] == results[0]
