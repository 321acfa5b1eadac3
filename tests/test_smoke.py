"""The demo vault fixture works end to end through the real entry point."""

import hashlib

from helpers import DEMO_SECRETS


def test_run_with_machine_key_sees_secret(demo):
    digest = hashlib.sha256(DEMO_SECRETS["DB_URL"].encode()).hexdigest()
    result = demo.ov("run", "--machine-key", str(demo.key), "--app", "demo", "--",
                     "sh", "-c", 'printf %s "$DB_URL" | sha256sum', check=0)
    assert result.out.split()[0] == digest
