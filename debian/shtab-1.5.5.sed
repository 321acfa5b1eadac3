# Fixes for what bookworm's python3-shtab 1.5.5 generates (debian/rules runs this on
# both completion scripts); both bugs are fixed in shtab 1.5.6, whose output these
# patterns no longer match.  Drop this file once Build-Depends can say
# python3-shtab (>= 1.5.6).

# bash: "${!name}" of an array is its first element, so "ov <TAB>" offered "auth"
# alone, "ov agent <TAB>" "start" alone (https://github.com/tqdm/shtab/issues/86).
# Read every choice, one a line: the completion function splits them on newlines.
/^  local current_action_choices_var="\${current_action}_choices"$/ {
  s/_choices"$/_choices[@]"/
  n
  s/^  current_action_choices="\${!current_action_choices_var}"$/  current_action_choices="$(printf '%s\\n' "${!current_action_choices_var}")"/
}

# zsh: sub-commands with a hyphen (rotate-key, change-password, derive-machine-key)
# named an options array that does not exist ($_shtab_ov_app_rotate-key_options):
# no option of theirs completed.  Arrays are named with underscores.
:zsh
s/^\( *[A-Za-z0-9_-]*) _arguments -C \$_shtab_[A-Za-z0-9_]*\)-\([A-Za-z0-9_-]*_options ;;\)$/\1_\2/
t zsh
