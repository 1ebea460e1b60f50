"""`sidecar top`: parsing an exposition and rendering the table."""

from __future__ import annotations

from sidecar.top import parse, render

EXPO = """\
# TYPE llm_live_tokens_total counter
llm_live_tokens_total{provider="openai",model="gpt-4o",token_type="output",key="a",team="t"} 100
llm_live_tokens_total{provider="openai",model="gpt-4o",token_type="input",key="a",team="t"} 30
# TYPE llm_tokens_total counter
llm_tokens_total{provider="openai",model="gpt-4o",token_type="output",source="reported",key="a",team="t"} 80
llm_tokens_total{provider="openai",model="gpt-4o",token_type="output",source="estimated",key="b",team="t"} 15
# TYPE llm_streams_in_flight gauge
llm_streams_in_flight{provider="openai",model="gpt-4o"} 2
# TYPE llm_requests_total counter
llm_requests_total{provider="openai",model="gpt-4o",key="a",team="t",code="200",outcome="completed",stream="true"} 4
"""


def test_parse_and_render_rates() -> None:
    a = parse(EXPO, 10.0)
    b = parse(EXPO.replace("} 100", "} 150"), 12.0)
    assert a.live[("gpt-4o", "output")] == 100 and a.in_flight["gpt-4o"] == 2
    table = render(a, b)
    row = next(line for line in table.splitlines() if line.startswith("gpt-4o"))
    cols = row.split()
    assert cols[1:4] == ["2", "25.0", "30"]  # streams, 50 tokens / 2 s, live input
    assert cols[-2:] == ["80", "15"]  # settled reported / estimated output
    assert "completed=4" in table
