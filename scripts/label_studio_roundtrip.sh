#!/usr/bin/env bash
# Once against the real Label Studio: export -> Label Studio -> corrections -> its JSON export -> jobs.review import.
#
#   scripts/label_studio_roundtrip.sh EXPORT_DIR [WORK_DIR]
#
# EXPORT_DIR: the --output of `python -m jobs.review export` (tasks.json, labelling-config.xml, manifest.json).
# It installs the `label-studio` package into its own virtual environment (WORK_DIR/venv, default
# /tmp/maskmodel-label-studio; reused when present), starts Label Studio on 127.0.0.1:$LS_PORT (default 8089)
# with its own data folder under WORK_DIR, signs in, creates a project with the exported labelling config,
# imports the exported tasks (with their pre-annotations) through its API, changes a few annotations through
# the API (a task accepted, then relabelled in a later annotation; a deleted box; an added box; one accepted),
# exports the project as Label Studio JSON, and runs `jobs.review import` on that export with this repository's
# Python ($PYTHON, default: python). Label Studio is stopped at the end. Loopback only; the first run needs the
# package registry for the install. Recorded in docs/review.md.
set -euo pipefail

EXPORT_DIR=${1:?usage: $0 EXPORT_DIR [WORK_DIR]}
WORK=${2:-/tmp/maskmodel-label-studio}
PORT=${LS_PORT:-8089}
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$WORK/venv
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/label-studio" ]; then
    python3 -m venv "$VENV"
    # sentry-sdk 3 refuses an option label-studio 1.23 passes it at start-up ("Unknown option 'send_default_pii'").
    "$VENV/bin/pip" install -q label-studio 'sentry-sdk<3'
fi
echo "label-studio $("$VENV/bin/pip" show label-studio | sed -n 's/^Version: //p') in $VENV"

EMAIL=reviewer@example.com
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(16))')
export LABEL_STUDIO_BASE_DATA_DIR=$WORK/data
unset HOST  # Label Studio reads HOST as its public URL; a bare host name in the environment is ignored noisily
"$VENV/bin/label-studio" start --no-browser --host 127.0.0.1 --port "$PORT" --internal-host 127.0.0.1 \
    --data-dir "$WORK/data" --username "$EMAIL" --password "$PASSWORD" >"$WORK/label-studio.log" 2>&1 &
LS_PID=$!
trap 'kill "$LS_PID" 2>/dev/null || true' EXIT

LS_URL=http://127.0.0.1:$PORT LS_EMAIL=$EMAIL LS_PASSWORD=$PASSWORD EXPORT_DIR=$EXPORT_DIR WORK=$WORK \
    "$VENV/bin/python" - <<'PY'
"""Drive Label Studio's HTTP API with a signed-in session: project, import, annotate, export."""
import copy
import json
import os
import time

import requests

url, work, export_dir = os.environ["LS_URL"], os.environ["WORK"], os.environ["EXPORT_DIR"]
deadline = time.time() + 300
while True:
    try:
        if requests.get(f"{url}/health", timeout=5).ok:
            break
    except requests.ConnectionError:
        pass
    if time.time() > deadline:
        raise SystemExit(f"Label Studio did not answer on {url} within 300 s; see {work}/label-studio.log")
    time.sleep(2)

s = requests.Session()
s.get(f"{url}/user/login/", timeout=30)
r = s.post(f"{url}/user/login/", data={"email": os.environ["LS_EMAIL"], "password": os.environ["LS_PASSWORD"],
                                       "csrfmiddlewaretoken": s.cookies["csrftoken"]},
           headers={"Referer": f"{url}/user/login/"}, timeout=30)
r.raise_for_status()
s.headers.update({"X-CSRFToken": s.cookies["csrftoken"], "Referer": url})


def api(method, path, **kw):
    r = s.request(method, f"{url}/api{path}", timeout=60, **kw)
    if not r.ok:
        raise SystemExit(f"{method} /api{path}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json() if r.content else None


print("Label Studio", api("GET", "/version").get("release"), "at", url)
config = open(os.path.join(export_dir, "labelling-config.xml")).read()
tasks = json.load(open(os.path.join(export_dir, "tasks.json")))
project = api("POST", "/projects", json={"title": "maskmodel review", "label_config": config})
print(f"project {project['id']} created with the exported labelling config")
imported = api("POST", f"/projects/{project['id']}/import", json=tasks)
print(f"imported {imported.get('task_count')} tasks with {imported.get('prediction_count')} pre-annotations")
listed = api("GET", f"/tasks?project={project['id']}&page_size=1000&fields=all")
listed = listed["tasks"] if isinstance(listed, dict) else listed
listed.sort(key=lambda t: t["id"])
classes = [c for c in ("mask", "no_mask")]


def prediction(task):
    preds = api("GET", f"/predictions?task={task['id']}")
    return copy.deepcopy(preds[0]["result"]) if preds else []


changes = []
for n, task in enumerate(listed[:4]):
    result = prediction(task)
    if n == 0 and result:  # accepted first, then a second annotation relabels a box: the later one must count
        api("POST", f"/tasks/{task['id']}/annotations", json={"result": result, "was_cancelled": False})
        time.sleep(1.1)
        old = result[0]["value"]["rectanglelabels"][0]
        result[0]["value"]["rectanglelabels"] = ["no_mask" if old == "mask" else "mask"]
        changes.append(f"task {task['id']}: accepted, then a later annotation relabels box {result[0]['id']} "
                       f"{old} -> {result[0]['value']['rectanglelabels'][0]}")
    elif n == 1 and result:  # delete a box
        gone = result.pop()
        changes.append(f"task {task['id']}: box {gone['id']} deleted")
    elif n == 2:  # add a box in the top-left corner
        w, h = (result[0]["original_width"], result[0]["original_height"]) if result else (100, 100)
        result.append({"id": "added1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                       "original_width": w, "original_height": h, "image_rotation": 0,
                       "value": {"x": 1.0, "y": 1.0, "width": 20.0, "height": 20.0, "rotation": 0,
                                 "rectanglelabels": ["no_mask"]}})
        changes.append(f"task {task['id']}: box added1 added")
    else:
        changes.append(f"task {task['id']}: accepted as pre-annotated")
    api("POST", f"/tasks/{task['id']}/annotations", json={"result": result, "was_cancelled": False})
print("\n".join(changes))
exported = api("GET", f"/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
out = os.path.join(work, "label-studio-export.json")
json.dump(exported, open(out, "w"), indent=1)
print(f"exported {len(exported)} tasks ({sum(1 for t in exported if t.get('annotations'))} annotated) to {out}")
PY

cd "$REPO"
PYTHONPATH=$REPO "$PY" -m jobs.review import --reviewed "$WORK/label-studio-export.json" --exported "$EXPORT_DIR" \
    --output "$WORK/labels.json"
