"""Greedy streams through a gateway, run inside a host's namespace by tests/test_netns.py (the test's own
namespace reaches none of the hosts). Usage: netns_streams.py GATEWAY MAX_TOKENS PROMPTS_JSON.

Prints `started` once every stream has a token, then reads one line from stdin (meanwhile the test cuts a
link) and notes how many streams had ended by then; when every stream has ended it prints one JSON object:
{"tokens": [[...], ...], "errors": [null | "...", ...], "ended_at_cut": N}. TLS comes from STAGEMESH_TLS_*."""

from __future__ import annotations

import json
import sys
import threading
import time

from stagemesh.gateway.client import Client, GatewayError, GenerationParams


def main() -> None:
    gateway, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    tokens: list[list[int]] = [[] for _ in prompts]
    errors: list[str | None] = [None] * len(prompts)
    ended = [False] * len(prompts)

    def run(i: int) -> None:
        params = GenerationParams(prompts[i], max_tokens=max_tokens, ignore_eos=True)
        try:
            with Client(gateway, timeout=120) as client:
                for part in client.stream(params):
                    tokens[i].extend(part.token_ids)
        except GatewayError as e:
            errors[i] = str(e)
        ended[i] = True

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not all(t or e for t, e in zip(tokens, ended)) and time.monotonic() < deadline:
        time.sleep(0.005)
    print("started", flush=True)
    sys.stdin.readline()
    ended_at_cut = sum(ended)
    for t in threads:
        t.join(150)
    print(json.dumps({"tokens": tokens, "errors": errors, "ended_at_cut": ended_at_cut}), flush=True)


if __name__ == "__main__":
    main()
