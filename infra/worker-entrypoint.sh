#!/bin/sh
# The semid image's entrypoint (infra/Dockerfile): makes $SEMID_REPO a git + DVC workspace, then runs the command
# (a Prefect worker, or the flow run a Kubernetes Job starts). Safe to run on every start:
#   - first start: clones the repository the image carries ($SEMID_SOURCE, its committed HEAD) to $SEMID_REPO,
#     without an upstream: each run's commit of dvc.lock and metrics/ (flows/publishing.py) stays in the
#     workspace unless SEMID_GIT_PUSH names a remote. An existing workspace (a volume) is left as it is;
#   - puts the workspace first on PYTHONPATH: flows and the `semid` stages DVC runs use the workspace's code;
#   - SEMID_STORAGE_ROOT (e.g. s3://semid/lake): sets storage.root in the workspace's params.yaml, makes
#     <root>/dvc its default DVC remote (`semid remote`) and commits both there, so the params a run reads are
#     those of the commit its record names. Credentials and endpoint stay in the AWS_* environment
#     (AWS_ENDPOINT_URL_S3 for MinIO): nothing secret is written to the workspace.
set -eu

: "${SEMID_SOURCE:=/opt/semid}"
: "${SEMID_REPO:=/workspace/semid}"

# Workers sharing one workspace volume start together: one prepares it at a time.
mkdir -p "$(dirname "$SEMID_REPO")"
exec 9>"$SEMID_REPO.entrypoint.lock"
flock 9

if [ ! -d "$SEMID_REPO/.git" ]; then
    echo "semid: cloning $SEMID_SOURCE into $SEMID_REPO" >&2
    git clone --quiet "$SEMID_SOURCE" "$SEMID_REPO"
    # The image's copy is no place to push to (a checked-out, throw-away repository).
    if [ -d "$SEMID_SOURCE" ]; then
        git -C "$SEMID_REPO" branch --unset-upstream
    fi
fi
cd "$SEMID_REPO"
export PYTHONPATH="$SEMID_REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${SEMID_STORAGE_ROOT:-}" ]; then
    python - "$SEMID_STORAGE_ROOT" <<'PY'
"""Set storage.root in params.yaml, keeping every other line (and comment) as it is."""
import json
import re
import sys
from pathlib import Path

import yaml

root, path = sys.argv[1], Path("params.yaml")
lines = path.read_text().splitlines(keepends=True)


def root_line() -> int | None:
    """The index of the line `  root: ...` directly under the top-level `storage:`."""
    section = next((i for i, line in enumerate(lines) if re.match(r"storage:\s*(#.*)?$", line)), None)
    if section is None:
        return None
    indent = None
    for i in range(section + 1, len(lines)):
        if re.match(r"[^\s#]", lines[i]):  # the next top-level key
            return None
        key = re.match(r"(\s+)(\w+):", lines[i])
        if key:
            indent = indent or key[1]
            if key[1] == indent and key[2] == "root":
                return i
    return None


i = root_line()
if i is None:
    sys.exit(f"semid: {path.resolve()} has no storage.root to set to {root} (expected a top-level `storage:` "
             "section with a `root:` key)")
found = re.match(r"(\s+root:[ \t]*)[^#\n]*?([ \t]+#.*)?$", lines[i].rstrip("\n"))
lines[i] = f"{found[1]}{json.dumps(root)}{found[2] or ''}\n"
path.write_text("".join(lines))
if yaml.safe_load(path.read_text())["storage"]["root"] != root:
    sys.exit(f"semid: {path.resolve()}: storage.root is not {root} after the edit")
PY
    case "$SEMID_STORAGE_ROOT" in
        data | ./data) ;;  # the workspace itself holds no DVC remote
        *) semid remote >&2 ;;
    esac
    if ! git diff --quiet -- params.yaml .dvc/config; then
        git -c user.name=semid-worker -c user.email=semid-worker@localhost commit --quiet \
            -m "storage.root: $SEMID_STORAGE_ROOT (set by infra/worker-entrypoint.sh)" -- params.yaml .dvc/config
        echo "semid: storage.root is $SEMID_STORAGE_ROOT (committed in $SEMID_REPO)" >&2
    fi
fi

exec 9>&-  # the lock is released; the command does not inherit it
exec "$@"
