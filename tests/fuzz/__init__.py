"""Coverage-guided fuzzing with atheris (libFuzzer for Python), issue 18.

One harness per target, each runnable as ``python3 -m tests.fuzz.<name> [libFuzzer flags]
[corpus dirs]``:

- ``decoder``: ``protocol.decode`` / ``decode_one`` on arbitrary frames (both codecs, both
  senders, bytes and text): results or ``RemoteProtocolError`` only, and every decoded message
  round-trips through ``encode``;
- ``handshake``: ``gateway.auth`` on arbitrary handshake headers, ``hello`` frames and (signed)
  JWTs: a principal or an ``AuthError`` only;
- ``http``: the gateway's own transport (``gateway.transport.HttpConnection``) on arbitrary bytes
  split at arbitrary points: no exception, no error logged, and what it writes back is valid
  HTTP/1.1 with the status that belongs there.

``python3 -m tests.fuzz.corpus DIR`` writes the seed corpus (from ``protocol/vectors/`` and a few
hand-written requests and handshakes) and a libFuzzer dictionary per harness; ``make fuzz`` runs
each harness for ``FUZZ_SECONDS``; ``tests/fuzz/test_fuzz.py`` runs each for a bounded number
of inputs in the normal test suite. The inputs that found bugs (fixed since) are in
``tests/fuzz/regressions/`` (see its README); the test suite runs each harness on them.

Nothing in this package imports the code under test at import time: each harness imports it
inside ``atheris.instrument_imports()``, which only instruments modules imported for the first
time.
"""
