# Sourced by scripts/serve and scripts/test: make .venv and install the project into it when missing
# or when setup.cfg/pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV with $PYTHON_BIN" >&2
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.tally-installed"
# The stamp is "<hash of setup.cfg and pyproject.toml> extras=[a,b]". Extras accumulate: serve after
# test finds its extra installed and installs nothing; a changed setup.cfg reinstalls every extra.
# constraints.txt pins the versions the suite passed with.
HASH="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
HAVE="$( [ -f "$STAMP" ] && sed -n 's/.* extras=\[\(.*\)\]$/\1/p' "$STAMP" || true)"
ALL="$(printf '%s\n' ${HAVE//,/ } ${EXTRAS//,/ } | sort -u | paste -sd, -)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH extras=[$ALL]" ]; then
    echo "bootstrap: installing tally${ALL:+[$ALL]} into .venv" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${ALL:+[$ALL]}" >&2
    echo "$HASH extras=[$ALL]" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
