"""The fast lane's native core (sidecar/_lane.c) under valgrind's memcheck: no invalid read or
write, no use of uninitialised memory, no leak, on generated runs that take every branch (escapes,
surrogates, control characters, invalid UTF-8, volatile pairs, padding, partial events, reads
past the stack buffer)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from sidecar.dialects import fastlane

from .conftest import tool

_SCRIPT = textwrap.dedent(r'''
    import random, sys
    from sidecar._lane import scan_run
    H = b'data: {"c":'
    KEYS = (b',"obfuscation":', b',"sequence_number":')
    SAFE = [b'a', b'\xc3\xa9', b'\xe4\xb8\xad', b'\\n', b'\\u00e9', b'\\"', b'0', b' ', b'}']
    BITS = SAFE + [b'"', b'\\', b'\\u', b'\\ud83d', b'\xff', b'\x01', b',"obfuscation":"x"',
                   b',"obfuscation":"', b',"sequence_number":-', b',"sequence_number":']
    rng = random.Random(int(sys.argv[1]))
    taken = big = 0
    for i in range(int(sys.argv[2])):
        events = []
        clean = i % 20 == 0  # long runs of well-formed events: reads past the stack buffer
        for _ in range(rng.randrange(1, 6)):
            bits = SAFE if clean or rng.random() < 0.7 else BITS
            s = b"".join(rng.choice(bits) for _ in range(rng.randrange(0, 1500 if clean else 10)))
            tail = b"}\n\n" if clean or rng.random() < 0.5 else (
                b"}" + b" " * rng.randrange(3) + rng.choice(BITS) + b"}\n\n")
            quoted = clean or rng.random() < 0.8
            events.append(H + b'"' + s + b'"' + tail if quoted else H + s + tail)
        data = b"".join(events)
        for cut in (len(data), rng.randrange(len(data) + 1)):
            for keys, pad, t in ((KEYS, False, b"}\n\n"), ((), True, b"}}\n\n"),
                                 ((), False, b"}\n\n")):
                end, text = scan_run(data[:cut], H, t, keys, pad)
                taken += end > 0
                big += end > 4096
    print("taken", taken, big)
''')


def test_native_core_is_clean_under_memcheck() -> None:
    if not fastlane.NATIVE:
        pytest.skip("the native core is not built in this install (no C compiler at install "
                    "time): there is no C to check")
    valgrind = tool("valgrind", "valgrind")
    res = subprocess.run(
        [valgrind, "--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
         "--track-origins=no", sys.executable, "-c", _SCRIPT, "7", "2000"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONMALLOC": "malloc"})
    assert res.returncode == 0, res.stderr[-3000:]
    taken, big = map(int, res.stdout.split()[-2:])
    # the runs were read, not only refused, and some past the stack buffer
    assert taken > 400 and big > 10, res.stdout
    # One report block per error; CPython itself has a few benign ones (its hash seed), so a
    # block fails the test when any of its frames is the native core's.
    blocks = re.split(r"==\d+== \n", res.stderr)
    ours = [b for b in blocks if "_lane" in b and re.search(
        r"Invalid (read|write)|uninitialised|definitely lost|Mismatched|Invalid free", b)]
    assert not ours, "\n".join(ours)[:4000]
