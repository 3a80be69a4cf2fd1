#!/usr/bin/env bash
# Shared helpers of the launch/ scripts (sourced, not run): errors and printed commands.
# Every command a script runs goes through `run`, which prints it first (shell-quoted, so it can
# be copied and pasted) and, under --dry-run, only prints it.

DRY_RUN=${DRY_RUN:-0}

# die MESSAGE: one line on stderr naming the script, exit status 2 (bad usage).
die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# quote ARGS...: the arguments as one shell-quoted string (plain words stay bare).
quote() {
  local out="" arg word
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="$arg"
    else
      word="${arg@Q}"
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

# run COMMAND ARGS...: print "+ COMMAND ARGS" on stdout, then run it (unless DRY_RUN=1).
run() {
  printf '+ %s\n' "$(quote "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# need VALUE FLAG: fail when a required option is empty.
need() {
  [[ -n "$1" ]] || die "$2 is required (see --help)"
}

# matches VALUE REGEX FLAG WHAT: fail unless VALUE matches REGEX.
matches() {
  [[ "$1" =~ $2 ]] || die "$3=$1 is not $4"
}
