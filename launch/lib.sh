# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): `run` executes a command, or with
# dry_run=true prints it as one shell-quoted line (the tests parse these lines).

# The command as one line; only words with shell-special characters are quoted.
show() {
  local words=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$word")
    else
      words+=("${word@Q}")
    fi
  done
  echo "${words[*]}"
}

run() {
  if [[ "${dry_run:-false}" == true ]]; then
    show "$@"
  else
    "$@"
  fi
}

# Prints the script's leading comment block (its documentation) and exits with status 2.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
