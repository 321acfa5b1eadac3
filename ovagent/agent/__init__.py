"""The daemon's side, in the process of `ov agent`: its lifecycle, the event loop,
authentication, releasing and spawning, systemd glue, the audit trail, locked memory
and `ov agent install`.  Never imports ovagent.client."""
