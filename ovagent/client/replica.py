"""What a host of a fleet knows of the shared store, kept in its vault's metadata:
the connection string, and for each environment the manifest it applied last (its
number, the versions it implies the store holds, and the sealed manifest itself)
and the highest manifest number it ever wrote.  pull.py and push.py read and keep
it; fleet.py (the commands) reports it."""

STORE = "store"                      # the store's connection string
SYNCED = "store_synced"              # time of the last pull
POSITION = "store_seq"               # the store's change number pulled
COUNTER = "manifest:{}/{}"           # the number of the manifest applied
ROWS = "rows:{}/{}"                  # the versions that manifest implies
APPLIED = "sealed:{}/{}"             # that manifest itself, sealed
WRITTEN = "written:{}/{}"            # the highest manifest number this host wrote
CONFLICT = "store_conflict"          # the last conflict: when, and what


def joined(vault):
    """The connection string of the store this vault replicates, or None."""
    return vault.store.get_meta().get(STORE)


def connect(dsn):
    """The store (psycopg is imported only by what talks to it)."""
    from .pgstore import PgStore

    return PgStore(dsn)


def applied(app, env, counter, entries, sealed):
    """The metadata of a manifest this host applied or wrote: its number, the
    versions it implies (each secret's 1 to its newest: a later pull compares the
    store's count with it), and the manifest itself (a later pull opens it to tell
    what changed, instead of opening every head of the environment)."""
    return {COUNTER.format(app, env): counter,
            ROWS.format(app, env): sum(version for version, _ in entries.values()),
            APPLIED.format(app, env): sealed}


def floor(seen, app, env):
    """The lowest manifest number of app/env this host may accept: what it applied,
    and what it wrote itself (a store that shows it less rolled back its write)."""
    return max(seen.get(COUNTER.format(app, env), 0), seen.get(WRITTEN.format(app, env), 0))
