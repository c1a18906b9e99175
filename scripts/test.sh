#!/usr/bin/env bash
# duckpool's one test command (the README shows it; .ci/run calls exactly it).
#
#   bash scripts/test.sh            ruff + mypy + the docs site (scripts/docs.sh) + the
#                                   whole suite on python3; the whole
#                                   suite but the `slow` tests on python3.13 (with
#                                   CPython's own process-pool tests) and on python3.9,
#                                   with Linux's pidfds, memfds and epoll hidden (the
#                                   portable paths); the seed contract on 3.10 and 3.12
#   bash scripts/test.sh --quick    only the whole suite on python3 (for development)
#   bash scripts/test.sh -- ARGS    ARGS go to every pytest run (e.g. -- -x -k demo)
#
# Each interpreter gets its own venv under .venvs/<major.minor> (reused between
# runs), all filled at once before the first test.  The project is installed into
# each as a wheel, never editable: the wheel ships the .pth start-up hook that
# serves duck.utils.multiprocessing.processpool, and the tests must exercise the
# installed package, not src/.
#
# `slow` marks the end-to-end runs of the tools around the pool (the bench
# harness, the CLI demo, the ASGI example under uvicorn): seconds each, in child
# interpreters, exercising pool behaviour that the other tests cover on every
# version.  python3 runs them; 3.9 and 3.13 do not.
#
# CPython's process-pool tests (3.13), then 3.13's suite, and the
# portable-paths run (3.9) run in the background beside python3's steps, each
# in a pytest process of its own (CPython's tests mostly sleep; a pool test
# mostly waits for processes to start, so on two cores the runs overlap
# well); their output is printed when they end.  The closing summary gives
# each step's seconds.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

quick=0
pytest_extra=()
while (($#)); do
    case "$1" in
        --quick) quick=1; shift ;;
        --) shift; pytest_extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "test.sh: unknown option '$1' (pytest arguments go after --)" >&2; exit 2 ;;
    esac
done

# --- interpreters -------------------------------------------------------------
if command -v pyenv >/dev/null 2>&1; then
    # Make python3.9 ... python3.13 resolve through the pyenv shims.  The
    # version python3 already selects goes first so that "python3" keeps
    # meaning the same interpreter inside this script as outside it.
    main_version="$(pyenv version-name 2>/dev/null | cut -d: -f1 || true)"
    other_versions="$(pyenv versions --bare | grep -E '^3\.(9|1[0-3])\.[0-9]+$' || true)"
    PYENV_VERSION="$( (printf '%s\n' "$main_version"; printf '%s\n' "$other_versions") \
        | grep -E '^3\.(9|1[0-3])\.[0-9]+$' | awk '!seen[$0]++' | paste -sd: -)"
    export PYENV_VERSION
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH  # the installed package is what gets tested, never src/

ci="${CI:-false}"
pytest_common=()
pip_quiet=()
if [[ "$ci" == "true" ]]; then
    pytest_common=(-q -ra)
    pip_quiet=(-q)
fi

started=$SECONDS
steps=()      # "name: ok (Ns)" lines for the closing summary
current_step="setup"
step_started=$SECONDS

# begin_step NAME / step_ok NAME: what the summary says a step was and took.
begin_step() { current_step="$1"; step_started=$SECONDS; }
step_ok() { steps+=("$1: ok ($((SECONDS - step_started))s)"); }

finish() {
    local rc="$1"
    echo
    echo "==> test.sh summary ($((SECONDS - started))s)"
    if ((${#steps[@]})); then
        printf '    %s\n' "${steps[@]}"
    fi
    if ((rc != 0)); then
        echo "    FAILED at: $current_step (exit $rc, after $((SECONDS - step_started))s)"
        echo "test.sh: FAILED"
    else
        echo "test.sh: OK -- ${summary_line:-nothing ran}"
    fi
}
banner() { echo; echo "==> $*"; }

# Resolve an interpreter name to its real executable ("" when it doesn't exist).
resolve_python() {
    local exe
    command -v "$1" >/dev/null 2>&1 || return 0
    exe="$("$1" -c 'import sys; print(sys.executable)' 2>/dev/null)" || return 0
    printf '%s' "$exe"
}

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

# venv_for PYTHON: the path of PYTHON's venv, .venvs/<major.minor>.
venv_for() { printf '%s' "$repo_root/.venvs/$(py_version "$1")"; }

# ensure_venv PYTHON: creates .venvs/<ver> unless a working one is there.
ensure_venv() {
    local base_python="$1" ver venv
    ver="$(py_version "$base_python")"
    venv="$(venv_for "$base_python")"
    if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1 \
        || [[ "$(py_version "$venv/bin/python" 2>/dev/null)" != "$ver" ]]; then
        banner "creating $venv ($base_python)"
        "$base_python" -m venv --clear "$venv"
    fi
}

# install_venv PYTHON EXTRAS: creates/reuses PYTHON's venv and installs
# duckpool[EXTRAS] from the wheel built in $wheel.  Several run at once, each
# in a subshell of its own, output to its own log.
install_venv() {
    local base_python="$1" extras="$2" venv venv_python began=$SECONDS
    ensure_venv "$base_python"
    venv="$(venv_for "$base_python")"
    venv_python="$venv/bin/python"
    banner "installing duckpool[$extras] into .venvs/$(py_version "$base_python")"
    local reused=0
    "$venv_python" -c 'import importlib.metadata as m; m.version("duckpool")' >/dev/null 2>&1 \
        && reused=1
    # --no-compile: byte-compiling every file of every dependency (matplotlib,
    # distributed, mypy, ...) was ~40% of an install; the modules the tests
    # import are compiled when first imported, and only those.
    "$venv_python" -m pip install ${pip_quiet[@]+"${pip_quiet[@]}"} --no-compile \
        "duckpool[$extras] @ file://$wheel"
    if ((reused)); then
        # Always the wheel just built, even when the version number didn't change.
        "$venv_python" -m pip install ${pip_quiet[@]+"${pip_quiet[@]}"} --no-compile \
            --force-reinstall --no-deps "$wheel"
    fi
    # Guard: duckpool must come from site-packages, not from the work tree.
    local origin
    origin="$("$venv_python" -c \
        'import importlib.util as u; print(u.find_spec("duckpool").origin)')"
    case "$origin" in
        "$repo_root"/src/*) echo "test.sh: duckpool resolves to $origin, not the installed copy" >&2
                            return 1 ;;
    esac
    # duckpool's own modules byte-compiled, as a default pip install leaves
    # them: where PYTHONDONTWRITEBYTECODE is set, every spawned or
    # forkserver worker of the suite would compile them again as it starts.
    "$venv_python" -m compileall -q "$(dirname "$origin")" \
        "$(dirname "$(dirname "$origin")")/_duckpool_duck_alias.py" || {
        echo "test.sh: duckpool's installed modules did not all byte-compile" >&2
        return 1
    }
    echo "    duckpool -> $origin ($((SECONDS - began))s for this venv)"
}

# require_dask PYTHON: the venvs given the dask extra must run tests/test_dask.py,
# which skips itself where distributed is missing; a failed install must not
# turn into a quiet skip.
require_dask() {
    "$1" -c 'import distributed' || {
        echo "test.sh: distributed is not importable in $1 (the dask extra)" >&2
        return 1
    }
}

# No pytest run may outlive this many seconds.  pytest-timeout bounds each test,
# but not the interpreter's exit: a pool whose dispatcher thread is gone can
# keep duckpool's atexit hook waiting forever, and CI would sit out its whole
# time limit.  The slowest step takes a few minutes on a busy machine.
step_timeout="${DUCKPOOL_TEST_STEP_TIMEOUT:-1200}"

# run_pytest LABEL PYTHON ARGS...: pytest exit 5 (nothing collected) is a failure too.
run_pytest() {
    local label="$1" python="$2"
    shift 2
    banner "$label"
    local rc=0
    begin_step "$label"
    # From the repo root: pytest finds pyproject.toml and tests/, while src/ is
    # never on sys.path (the layout keeps the package one level down).
    timeout --foreground --kill-after=30 "$step_timeout" \
        "$python" -m pytest ${pytest_common[@]+"${pytest_common[@]}"} "$@" \
        ${pytest_extra[@]+"${pytest_extra[@]}"} || rc=$?
    pytest_rc_ok "$label" "$rc" || return "$rc"
    step_ok "$label"
}

# pytest_rc_ok LABEL RC: true when RC is a pass; says so when exit 5 is why not.
pytest_rc_ok() {
    if (($2 == 5)); then
        echo "test.sh: $1 collected no tests -- that is a failure" >&2
    elif (($2 == 124)); then
        echo "test.sh: $1 did not end within ${step_timeout}s; stopped (a hang?)" >&2
    fi
    (($2 == 0))
}

# start_background LABEL PYTHON ARGS...: run_pytest's run, started now and left
# to go on beside the next steps; its output goes to a log of its own that
# finish_background prints.  For runs that leave a core free much of the time
# (CPython's process-pool tests spend three quarters of their time asleep; a
# suite of process-pool tests waits on process starts): each runs in a pytest
# process of its own, so no test process gains a thread or a neighbour's
# children.  Environment assignments before the call reach that run only.
# With bg_after=N set, the run starts only once background run N has ended
# (N's slot then holds two runs one after the other).
bg_labels=() bg_pids=() bg_started=()
start_background() {
    local label="$1" python="$2" i="${#bg_labels[@]}" after="${bg_after:-}"
    shift 2
    bg_labels+=("$label")
    bg_started+=("$SECONDS")
    echo
    if [[ -n "$after" ]]; then
        echo "==> $label: to start in the background once '${bg_labels[$after]}' ends"
    else
        echo "==> $label: started in the background, output below when it ends"
    fi
    (
        if [[ -n "$after" ]]; then
            while [[ ! -e "$work_dir/background-$after.done" ]]; do sleep 1; done
            [[ ! -e "$work_dir/stopping" ]] || exit 143  # (stop_background: never start)
            echo "$SECONDS" >"$work_dir/background-$i.began"
        fi
        # A subshell that execs keeps SIGINT's default action (a bare `cmd &`
        # would ignore it, and the tests' own children would inherit that).
        ( exec timeout --foreground --kill-after=30 "$step_timeout" \
            "$python" -m pytest ${pytest_common[@]+"${pytest_common[@]}"} "$@" \
            ${pytest_extra[@]+"${pytest_extra[@]}"} >"$work_dir/background-$i.log" 2>&1 ) &
        echo "$!" >"$work_dir/background-$i.pid"
        rc=0
        wait "$!" || rc=$?
        echo "$rc $SECONDS" >"$work_dir/background-$i.done"
    ) &
    bg_pids+=("$!")
}

# finish_background: waits for each background run, prints its output, and
# fails (as run_pytest does) if one failed.
finish_background() {
    local i rc ended
    for i in "${!bg_pids[@]}"; do
        [[ -n "${bg_pids[$i]}" ]] || continue
        begin_step "${bg_labels[$i]} (waiting for it)"
        wait "${bg_pids[$i]}" || true
        bg_pids[i]=""
        banner "${bg_labels[$i]} (ran in the background)"
        cat "$work_dir/background-$i.log"
        read -r rc ended <"$work_dir/background-$i.done" || { rc=1; ended=$SECONDS; }
        if [[ -e "$work_dir/background-$i.began" ]]; then
            read -r bg_started[i] <"$work_dir/background-$i.began"
        fi
        current_step="${bg_labels[$i]}"
        pytest_rc_ok "${bg_labels[$i]}" "$rc" || return "$rc"
        steps+=("${bg_labels[$i]}: ok ($((ended - bg_started[i]))s, beside the steps above)")
    done
}

# stop_background: on an early exit, ends the background pytest runs (by pid).
stop_background() {
    local i pid
    : >"$work_dir/stopping"  # a run waiting for its turn (bg_after) never starts
    for i in "${!bg_pids[@]}"; do
        [[ -n "${bg_pids[$i]}" ]] || continue
        pid="$(cat "$work_dir/background-$i.pid" 2>/dev/null || true)"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
        else  # still waiting for its turn (bg_after), or just starting
            kill -TERM "${bg_pids[$i]}" 2>/dev/null || true
        fi
        wait "${bg_pids[$i]}" 2>/dev/null || true
        # (Started just before its subshell was stopped: its pytest is still there.)
        if [[ -z "$pid" ]]; then
            pid="$(cat "$work_dir/background-$i.pid" 2>/dev/null || true)"
            [[ -z "$pid" ]] || kill -TERM "$pid" 2>/dev/null || true
        fi
        echo "test.sh: stopped the background run (${bg_labels[$i]})" >&2
        bg_pids[i]=""
    done
}

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/duckpool-test.XXXXXX")"  # the wheel, logs
wheel=""
trap 'exit_status=$?; stop_background; rm -rf "$work_dir"; finish "$exit_status"' EXIT

# --- interpreters ---------------------------------------------------------------
main_python="$(resolve_python python3)"
if [[ -z "$main_python" ]]; then
    echo "test.sh: no python3 on PATH" >&2
    exit 1
fi
main_ver="$(py_version "$main_python")"
case "$main_ver" in
    3.9|3.1[0-9]) ;;
    *) echo "test.sh: python3 is $main_ver; duckpool needs >= 3.9" >&2; exit 1 ;;
esac
main_extras="test,lint,bench,dask,docs"

# The rest of the matrix, "ver|exe|extras" each.  3.9 (oldest) runs the whole
# suite but the `slow` tests, 3.13 (newest) the whole suite and CPython's own
# process-pool tests against duckpool's executor (the installed test package
# ships with it).  3.10 and 3.12 run the seed-contract tests.
matrix=()
if ((!quick)); then
    for name in python3.9 python3.10 python3.12 python3.13; do
        exe="$(resolve_python "$name")"
        if [[ -z "$exe" ]]; then
            echo
            echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            echo "!!! SKIPPED: $name not found -- its tests will NOT run        !!!"
            echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            steps+=("$name: SKIPPED (interpreter not found)")
            continue
        fi
        ver="$(py_version "$exe")"
        [[ "$ver" == "$main_ver" ]] && continue
        # The newest Python also runs the Dask backend's tests, as python3 does.
        extras="test"
        [[ "$ver" == "3.13" ]] && extras="test,dask"
        matrix+=("$ver|$exe|$extras")
    done
fi

# --- venvs: one wheel, installed into every venv at once -----------------------
# The installs are mostly waiting on pip and the disk; run one after another
# they took as long as the whole 3.9 suite.
begin_step "install"
ensure_venv "$main_python"  # its pip builds the wheel
main_venv_python="$(venv_for "$main_python")/bin/python"
banner "building the duckpool wheel"
"$main_venv_python" -m pip wheel ${pip_quiet[@]+"${pip_quiet[@]}"} --no-deps \
    -w "$work_dir/wheel" "$repo_root"
wheel="$(ls "$work_dir"/wheel/duckpool-*.whl)"

install_pids=() install_names=()
for entry in "$main_ver|$main_python|$main_extras" ${matrix[@]+"${matrix[@]}"}; do
    IFS="|" read -r ver exe extras <<<"$entry"
    (set -e; install_venv "$exe" "$extras") >"$work_dir/install-$ver.log" 2>&1 &
    install_pids+=("$!")
    install_names+=("$ver")
done
install_failed=()
for i in "${!install_pids[@]}"; do
    wait "${install_pids[$i]}" || install_failed+=("${install_names[$i]}")
    cat "$work_dir/install-${install_names[$i]}.log"
done
if ((${#install_failed[@]})); then
    current_step="install on python ${install_failed[*]}"
    exit 1
fi
require_dask "$main_venv_python"
main_bin="$(dirname "$main_venv_python")"
step_ok "install into ${#install_names[@]} venvs (${install_names[*]}), at once"

# --- in the background: CPython's process-pool tests then 3.13's suite, the portable paths
ran=()
for entry in ${matrix[@]+"${matrix[@]}"}; do
    IFS="|" read -r ver exe extras <<<"$entry"
    venv_python="$(venv_for "$exe")/bin/python"
    case "$ver" in
        3.13)
            require_dask "$venv_python"
            # Its own cache directory: two sessions never write one file at once.
            cpython_suite_run="${#bg_labels[@]}"
            start_background "pytest -m cpython_suite (CPython's process-pool tests), python 3.13" \
                "$venv_python" -m cpython_suite -o cache_dir=.pytest_cache/cpython-suite
            ran+=("CPython suite on 3.13")
            # Then, in the same slot, the whole suite but the `slow` end-to-end
            # runs of the tools (bench, demo, the ASGI example): they run on
            # python3, and the pool behaviour they drive is covered here by
            # the rest of the suite.  Beside python3's suite rather than after
            # it: on two cores the two overlap well, as the portable run does.
            bg_after="$cpython_suite_run" \
                start_background "pytest, whole suite but slow, python $ver" \
                "$venv_python" -m "not soak and not cpython_suite and not slow" \
                -o cache_dir=.pytest_cache/py313
            ran+=("whole suite but slow on $ver") ;;
        3.9)
            # The portable-paths run: every interpreter of it lacks Linux's
            # pidfds, memfds and epoll (tests/portable/sitecustomize.py), as
            # on macOS and the BSDs, so their fallbacks run on every change.
            # (The Linux paths run on python3 and 3.13.)  Beside the other
            # steps: a pool test mostly waits for processes to start.
            PYTHONPATH="$repo_root/tests/portable" DUCKPOOL_TEST_PORTABLE=1 \
                start_background "pytest, whole suite but slow, portable paths, python $ver" \
                "$venv_python" -m "not soak and not cpython_suite and not slow" \
                -o cache_dir=.pytest_cache/portable
            ran+=("whole suite but slow on $ver with portable paths") ;;
    esac
done

# --- main interpreter: lint, types, whole suite ---------------------------------
if ((!quick)); then
    lint_paths=()
    for p in src tests benchmarks examples docs/conf.py docs/_ext; do
        [[ -e "$p" ]] && lint_paths+=("$p")
    done
    begin_step "ruff check"
    banner "ruff check and format --check ${lint_paths[*]}"
    "$main_bin/ruff" check "${lint_paths[@]}"
    "$main_bin/ruff" format --check "${lint_paths[@]}"
    step_ok "ruff check"

    begin_step "mypy"
    banner "mypy (strict, config in pyproject.toml)"
    "$main_bin/mypy"
    step_ok "mypy"

    begin_step "docs"
    banner "documentation site (scripts/docs.sh: sphinx -W, offline)"
    bash "$repo_root/scripts/docs.sh" "$main_venv_python"
    step_ok "docs"
    ran+=("ruff" "mypy" "docs")
fi

run_pytest "pytest, whole suite, python $main_ver" "$main_venv_python"
ran+=("whole suite on $main_ver")

# --- the rest of the matrix ------------------------------------------------------
for entry in ${matrix[@]+"${matrix[@]}"}; do
    IFS="|" read -r ver exe extras <<<"$entry"
    venv_python="$(venv_for "$exe")/bin/python"
    case "$ver" in
        3.9|3.13) ;;  # in the background (above)
        *)
            run_pytest "pytest -m contract, python $ver" "$venv_python" -m contract
            ran+=("contract on $ver") ;;
    esac
done

finish_background

summary_line="ran: $(printf '%s, ' "${ran[@]}" | sed 's/, $//')"
