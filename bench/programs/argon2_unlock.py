"""Argon2id unlock of a vault in-process: ``argon2_unlock.py VAULT COUNT PASSWORD``
prints JSON {"times": [seconds...], "kdf": the vault's KDF parameters}.

Run by path with the bench's throwaway venv's python (bench/sections.py), so that
ovagent comes from that venv, never from the repository."""

import json
import sys
import time

from ovagent.core.vault import Vault


def main(path, count, password):
    vault = Vault.open(path)
    times = []
    for _ in range(int(count)):
        t0 = time.perf_counter()
        vault.unlock(password.encode())
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "kdf": vault.kdf.__dict__}))


if __name__ == "__main__":
    main(*sys.argv[1:])
