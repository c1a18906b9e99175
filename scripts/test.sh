#!/usr/bin/env bash
# duckpool's one test command (the README shows it; .ci/run calls exactly it).
#
#   bash scripts/test.sh            ruff + mypy + the whole suite on python3; the whole
#                                   suite on python3.9 and python3.13 (with CPython's own
#                                   process-pool tests); the seed contract on 3.10 and 3.12
#   bash scripts/test.sh --quick    only the whole suite on python3 (for development)
#   bash scripts/test.sh -- ARGS    ARGS go to every pytest run (e.g. -- -x -k demo)
#
# Each interpreter gets its own venv under .venvs/<major.minor> (reused between
# runs).  The project is installed into it as a wheel, never editable: the wheel
# ships the .pth start-up hook that serves duck.utils.multiprocessing.processpool,
# and the tests must exercise the installed package, not src/.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

quick=0
pytest_extra=()
while (($#)); do
    case "$1" in
        --quick) quick=1; shift ;;
        --) shift; pytest_extra=("$@"); break ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
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

wheel_dir="$(mktemp -d "${TMPDIR:-/tmp}/duckpool-wheel.XXXXXX")"
cleanup_wheel() { rm -rf "$wheel_dir"; }
trap 'exit_status=$?; cleanup_wheel; finish "$exit_status"' EXIT
wheel=""

# prepare_venv PYTHON EXTRAS: creates/reuses .venvs/<ver>, installs deps and the
# project's wheel, and sets $venv_python.
prepare_venv() {
    local base_python="$1" extras="$2" ver venv
    ver="$(py_version "$base_python")"
    venv="$repo_root/.venvs/$ver"
    if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1 \
        || [[ "$(py_version "$venv/bin/python" 2>/dev/null)" != "$ver" ]]; then
        banner "creating $venv ($base_python)"
        "$base_python" -m venv --clear "$venv"
    fi
    venv_python="$venv/bin/python"
    if [[ -z "$wheel" ]]; then
        banner "building the duckpool wheel"
        "$venv_python" -m pip wheel ${pip_quiet[@]+"${pip_quiet[@]}"} --no-deps -w "$wheel_dir" "$repo_root"
        wheel="$(ls "$wheel_dir"/duckpool-*.whl)"
    fi
    banner "installing duckpool[$extras] into .venvs/$ver"
    "$venv_python" -m pip install ${pip_quiet[@]+"${pip_quiet[@]}"} "duckpool[$extras] @ file://$wheel"
    # Always the wheel just built, even when the version number didn't change.
    "$venv_python" -m pip install ${pip_quiet[@]+"${pip_quiet[@]}"} --force-reinstall --no-deps "$wheel"
    # Guard: duckpool must come from site-packages, not from the work tree.
    local origin
    origin="$("$venv_python" -c \
        'import importlib.util as u; print(u.find_spec("duckpool").origin)')"
    case "$origin" in
        "$repo_root"/src/*) echo "test.sh: duckpool resolves to $origin, not the installed copy" >&2
                            return 1 ;;
    esac
    echo "    duckpool -> $origin"
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

# run_pytest LABEL PYTHON ARGS...: pytest exit 5 (nothing collected) is a failure too.
run_pytest() {
    local label="$1" python="$2"
    shift 2
    banner "$label"
    local rc=0
    begin_step "$label"
    # From the repo root: pytest finds pyproject.toml and tests/, while src/ is
    # never on sys.path (the layout keeps the package one level down).
    "$python" -m pytest ${pytest_common[@]+"${pytest_common[@]}"} "$@" \
        ${pytest_extra[@]+"${pytest_extra[@]}"} || rc=$?
    if ((rc == 5)); then
        echo "test.sh: $label collected no tests -- that is a failure" >&2
    fi
    if ((rc != 0)); then
        return "$rc"
    fi
    step_ok "$label"
}

# --- main interpreter: lint, types, whole suite -------------------------------
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

begin_step "install on python $main_ver"
main_extras="test,lint,bench,dask"
prepare_venv "$main_python" "$main_extras"
main_venv_python="$venv_python"
require_dask "$main_venv_python"
main_bin="$(dirname "$main_venv_python")"
step_ok "install on python $main_ver"

ran=()
if ((!quick)); then
    lint_paths=()
    for p in src tests benchmarks examples; do
        [[ -e "$p" ]] && lint_paths+=("$p")
    done
    begin_step "ruff check"
    banner "ruff check ${lint_paths[*]}"
    "$main_bin/ruff" check "${lint_paths[@]}"
    step_ok "ruff check"

    begin_step "mypy"
    banner "mypy (strict, config in pyproject.toml)"
    "$main_bin/mypy"
    step_ok "mypy"
    ran+=("ruff" "mypy")
fi

run_pytest "pytest, whole suite, python $main_ver" "$main_venv_python"
ran+=("whole suite on $main_ver")

# --- the rest of the matrix ----------------------------------------------------
# 3.9 (oldest) and 3.13 (newest) run the whole suite; 3.13 also runs CPython's
# own process-pool tests against duckpool's executor (the installed test
# package ships with it).  3.10 and 3.12 run the seed-contract tests.
if ((!quick)); then
    for name in python3.9 python3.10 python3.12 python3.13; do
        exe="$(resolve_python "$name")"
        if [[ -z "$exe" ]]; then
            echo
            echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            echo "!!! SKIPPED: $name not found -- its tests did NOT run             !!!"
            echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            steps+=("$name: SKIPPED (interpreter not found)")
            continue
        fi
        ver="$(py_version "$exe")"
        [[ "$ver" == "$main_ver" ]] && continue
        begin_step "install on python $ver"
        if [[ "$ver" == "3.13" ]]; then
            # The newest Python also runs the Dask backend's tests, as python3 does.
            prepare_venv "$exe" "test,dask"
            require_dask "$venv_python"
        else
            prepare_venv "$exe" "test"
        fi
        step_ok "install on python $ver"
        case "$ver" in
            3.9)
                run_pytest "pytest, whole suite, python $ver" "$venv_python" \
                    -m "not soak and not cpython_suite"
                ran+=("whole suite on $ver") ;;
            3.13)
                run_pytest "pytest, whole suite + CPython's process-pool tests, python $ver" \
                    "$venv_python"
                ran+=("whole suite + CPython suite on $ver") ;;
            *)
                run_pytest "pytest -m contract, python $ver" "$venv_python" -m contract
                ran+=("contract on $ver") ;;
        esac
    done
fi

summary_line="ran: $(printf '%s, ' "${ran[@]}" | sed 's/, $//')"
