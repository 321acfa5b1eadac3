#!/usr/bin/env bash
# The main job, end to end on a throwaway vault: create a vault and a machine key,
# store a secret, start the agent, and run a command with that secret through
# `ov run --agent`: the agent releases it sealed to the signed request, and ov execs
# the command in place (same pid).  The value never crosses the agent's socket in the
# clear.  Everything lives in a temporary directory removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/bootstrap.sh debian            # installs what is missing (apt, venv)
OV="$PWD/.venv-debian/bin/ov"

work=$(mktemp -d)
cleanup() {
    "$OV" agent stop --pid-file "$work/run/ov-agent.pid" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
export OV_VAULT="$work/vault.db"
key="$work/machine.kek"
sock="$work/run/ov-agent.sock"
password="demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step ov auth init --password-stdin
"$OV" auth init --password-stdin <<<"$password"
step ov auth derive-machine-key --out "$key" --password-stdin
"$OV" auth derive-machine-key --out "$key" --password-stdin <<<"$password"
step ov app create demo '&&' ov env create production --app demo
"$OV" app create demo --machine-key "$key"
"$OV" env create production --app demo
step "printf ... | ov secret set DATABASE_URL --app demo"
printf 'postgres://demo:%s@db.internal/demo' "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')" \
    | "$OV" secret set DATABASE_URL --app demo --machine-key "$key"
"$OV" secret list --app demo

step ov agent start --machine-key "$key" --app demo --socket "$sock"
"$OV" agent start --machine-key "$key" --app demo --socket "$sock" \
    --pid-file "$work/run/ov-agent.pid"
"$OV" agent status --machine-key "$key" --socket "$sock"

step ov run --agent --secrets DATABASE_URL -- sh -c '...'
"$OV" run --agent --socket "$sock" --machine-key "$key" --secrets DATABASE_URL -- \
    sh -c 'echo "pid $$ (ov itself, now the command) sees DATABASE_URL: ${#DATABASE_URL} characters, sha256 $(printf %s "$DATABASE_URL" | sha256sum | cut -c1-16)..."; exit 3' \
    && status=0 || status=$?
echo "exit status (the command's own): $status"

step ov run --agent --spawn -- sh -c '...'   "# the agent runs it; same user, same world"
"$OV" run --agent --spawn --socket "$sock" --machine-key "$key" -- \
    sh -c 'echo "pid $$, started by the agent, exits with 4"; exit 4' \
    && status=0 || status=$?
echo "exit status relayed by the agent: $status"

step ov agent status '&&' ov agent stop
"$OV" agent status --machine-key "$key" --socket "$sock"
"$OV" agent stop --pid-file "$work/run/ov-agent.pid"
echo
echo "Demo done: the agent released the secret sealed to each signed request; no plaintext crossed its socket."
