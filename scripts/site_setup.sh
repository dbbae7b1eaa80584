# shellcheck shell=bash
# The user's setup_commands (module load, conda activate, ...), run in the shell
# that sources this file, so what they set (PATH, a module's variables) reaches the
# Python and Ray started after them. Sourced, not run:
#   . site_setup.sh FILE [STATUS_FILE]
# nounset is off while they run: module and conda scripts read unset variables. A
# line that fails stops the caller; the failure, with this host's name, goes to
# stderr and, given a STATUS_FILE, to the cluster's status, which the flow reports.
ar_setup_file="$1" ar_setup_status_file="${2:-}"
if [ -s "$ar_setup_file" ]; then
    printf '%s [%s] running setup_commands\n' "$(date +%H:%M:%S)" "$(hostname -s)" >&2
    # shellcheck disable=SC2317 # called by the ERR trap below
    ar_setup_failed() {
        local problem
        problem="setup_commands failed on $(hostname -s): '$1' exited $2"
        printf '%s\n' "$problem" >&2
        [ -z "$ar_setup_status_file" ] || printf 'RAY_FAILED=%s\n' "$problem" >>"$ar_setup_status_file"
    }
    set +u
    # errtrace: a failing line inside a function the user's lines call is reported too
    set -E
    trap 'ar_setup_failed "$BASH_COMMAND" "$?"' ERR
    # shellcheck disable=SC1090 # the user's own file
    . "$ar_setup_file"
    trap - ERR
    set +E
    set -u
    unset -f ar_setup_failed
fi
unset ar_setup_file ar_setup_status_file
