# shtab's zsh script (1.5.5, and still 1.13) lists the commands of a command's
# subcommands with its own: "ov agent <TAB>" offered "check" and "show", which are
# "ov agent policy"'s.  Drop them from ov agent's list (the zsh script only; bash is
# right).
/^_shtab_ov_agent_commands() {$/,/^}$/ {
  /^ *"\(check\|show\):/d
}
