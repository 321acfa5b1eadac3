"""The `ov` command's side (never the agent's): `ov run`'s options, talking to the
agent, the project configuration, exec with secrets, and dotenv files for
`ov secret import`.  Never imports ovagent.agent; on the `ov run --agent` path,
nothing heavy (tests/test_entry.py)."""
