"""Bytes a nonce costs the agent's replay cache (NonceCache), measured with
tracemalloc over 20,000 nonces; prints one number.

Run by path with the bench's throwaway venv's python (bench/sections.py), so that
ovagent comes from that venv, never from the repository."""

import os
import tracemalloc

from ovagent.agent.auth import NonceCache


def main():
    cache = NonceCache()
    nonces = [os.urandom(16).hex() for _ in range(20000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for nonce in nonces:
        cache.add(nonce)
    after = tracemalloc.get_traced_memory()[0]
    # the nonce strings themselves arrive in each request and stay referenced by the
    # cache
    print((after - before) / 20000 + (len(nonces[0]) + 49))


if __name__ == "__main__":
    main()
