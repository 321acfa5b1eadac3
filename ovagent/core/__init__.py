"""What both sides share: errors, paths, validation, the wire protocol and the seal,
the cryptography, the vault and its store, key files and unlocking, /proc parsing.
Imports nothing from ovagent.client, ovagent.agent or the command line; the modules
on the client's path (errors, paths, validate, canonical, protocol, seal, keyfile)
use only the standard library's lightest parts."""
