"""The caller's side, in the process of `ov run`: its options, talking to the agent,
the project configuration, dotenv files, and exec with secrets.  Never imports
ovagent.agent; on the `ov run --agent` path, nothing heavy (tests/test_entry.py)."""
