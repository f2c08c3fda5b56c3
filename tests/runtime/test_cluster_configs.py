"""The files in cluster/ parse, agree with pyproject.toml and with each other, and name real jobs.

Static checks only: no Ray is started, nothing is imported from the project
(job flags are read from the config dataclasses' source with ``ast``), so the
whole file runs in well under five seconds.

What "agree" means (cluster/README.md, "Versions"): one Ray version, one
Python version and one pair of base images across the Ray cluster launcher
config, the KubeRay manifests, the Dockerfile, the local cluster script and
the README, and that Ray version inside pyproject.toml's Ray pin.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in ("", ".yaml", ".yml", ".md", ".sh"))

# rayproject/ray:2.60.0-py311 / rayproject/ray:2.60.0-py311-gpu
OFFICIAL_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?P<gpu>-gpu)?$")
# The project image built FROM the official one by cluster/Dockerfile:
# ${MASKMODEL_IMAGE_REPO}:ray2.60.0-py311[-gpu] (or <registry>/maskmodel:ray2.60.0-py311[-gpu])
PROJECT_IMAGE = re.compile(
    r"(?:maskmodel|MASKMODEL_IMAGE_REPO\}?):ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?P<gpu>-gpu)?$")
IMAGE_MENTION = re.compile(r"(?:rayproject/ray:|maskmodel:ray|MASKMODEL_IMAGE_REPO\}?:ray)[0-9][\w.-]*")
JOB_COMMAND = re.compile(r"python -m (jobs\.[A-Za-z_]\w*)")
PLACEHOLDER = re.compile(r"\$\{(MASKMODEL_\w+)\}")
ENVSUBST_LIST = re.compile(r"envsubst '([^']*)'")


# ----------------------------------------------------------------------------- helpers

def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> Iterator[tuple[Path, Any]]:
    for path in YAML_FILES:
        for doc in _docs(path):
            yield path, doc


def _walk(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair in a parsed YAML tree; list items keep their parent's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_docs() if isinstance(d, dict) and d.get("kind") == kind]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> SpecifierSet:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.match(r"ray(\[[^\]]*\])?\s*(?P<spec>[<>=!~].*)$", dep.strip())
        if m:
            return SpecifierSet(m.group("spec"))
    raise AssertionError("pyproject.toml has no ray dependency")


def _image_fields() -> list[tuple[Path, str]]:
    """Every image a YAML file runs: `image:` in pod specs, docker images of the launcher config."""
    keys = {"image", "head_image", "worker_image"}
    return [(p, v) for p, d in _all_docs() for k, v in _walk(d) if k in keys and isinstance(v, str)]


def _parse_image(image: str) -> re.Match | None:
    return OFFICIAL_IMAGE.search(image) or PROJECT_IMAGE.search(image)


def _commands(text: str) -> Iterator[tuple[str, str]]:
    """(module, argument text) for every `python -m jobs.X ...` command, shell line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for m in JOB_COMMAND.finditer(joined):
        rest = joined[m.end():]
        end = re.search(r"\n|&&|\|\||;|`|\)", rest)
        yield m.group(1), rest[: end.start()] if end else rest


def _config_flags(module: str) -> set[str]:
    """The --flags of `python -m jobs.X`, read from the config dataclass named in its parse_config call."""
    job = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(job.read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", getattr(n.func, "attr", None)) == "parse_config")
    arg = call.args[0]
    if isinstance(arg, ast.Attribute):  # from maskmodel.data import synth; synth.DatasetConfig
        cls_name = arg.attr
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and any((a.asname or a.name) == arg.value.id for a in n.names))
        name = next(a.name for a in node.names if (a.asname or a.name) == arg.value.id)
        source = ROOT / (f"{node.module}.{name}".replace(".", "/") + ".py")
    else:  # from maskmodel.score.plan import ScoreConfig, or a class in the job itself
        cls_name, source = arg.id, job
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == cls_name for a in node.names):
                source = ROOT / (node.module.replace(".", "/") + ".py")
    # The class itself, fields it inherits included (the training configs share TrainRunConfig's):
    # configs import neither torch nor Ray, so importing the module that defines it is cheap.
    import dataclasses
    import importlib

    cls = getattr(importlib.import_module(".".join(source.relative_to(ROOT).with_suffix("").parts)), cls_name)
    flags = {"--help"}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        flags.add(flag)
        if f.type in (bool, "bool"):
            flags.add("--no-" + flag[2:])
    return flags


# ----------------------------------------------------------------------------- parsing

def test_every_yaml_file_parses() -> None:
    assert YAML_FILES, "cluster/ has no YAML files"
    for path in YAML_FILES:
        docs = _docs(path)
        assert docs, f"{path.relative_to(ROOT)} is empty"


def test_expected_files_exist() -> None:
    for rel in ("ray-cluster-aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
                "kuberay/cronjob-score-nightly.yaml", "local-cluster.sh", "README.md", "Dockerfile"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


def test_local_cluster_script_is_valid_bash() -> None:
    script = CLUSTER / "local-cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    assert script.stat().st_mode & 0o111, "cluster/local-cluster.sh is not executable"


def test_launcher_config_matches_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing (starting) anything
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["head_node_type"] in config["available_node_types"]


# ----------------------------------------------------------------------------- versions agree

def test_ray_and_python_versions_agree_everywhere() -> None:
    found: dict[str, set[str]] = {"ray": set(), "py": set()}
    where: list[str] = []

    for path, image in _image_fields():
        m = _parse_image(image)
        assert m, f"{path.relative_to(ROOT)}: image {image!r} is neither rayproject/ray:<ray>-py<py>[-gpu] " \
                  f"nor ${{MASKMODEL_IMAGE_REPO}}:ray<ray>-py<py>[-gpu]"
        found["ray"].add(m["ray"])
        found["py"].add(m["py"])
        where.append(f"{path.name}: {image}")

    for path, doc in _all_docs():
        for k, v in _walk(doc):
            if k == "rayVersion":
                found["ray"].add(str(v))
                where.append(f"{path.name}: rayVersion {v}")

    # Images named in any text (Dockerfile FROM/ARG, README, comments, build commands).
    for path in TEXT_FILES + [CLUSTER / "Dockerfile"]:
        for mention in IMAGE_MENTION.findall(path.read_text()):
            m = _parse_image(mention.rstrip("."))
            assert m, f"{path.relative_to(ROOT)}: cannot read the versions in {mention!r}"
            found["ray"].add(m["ray"])
            found["py"].add(m["py"])

    assert len(found["ray"]) == 1, f"Ray versions disagree: {sorted(found['ray'])}\n" + "\n".join(where)
    assert len(found["py"]) == 1, f"Python versions disagree: {sorted(found['py'])}\n" + "\n".join(where)

    ray_version = found["ray"].pop()
    assert ray_version in _ray_pin(), f"cluster/ uses Ray {ray_version}, pyproject.toml pins {_ray_pin()}"

    py = found["py"].pop()
    python = f"{py[0]}.{py[1:]}"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(python) in requires, f"cluster/ uses Python {python}, pyproject.toml requires {requires}"

    # The local script warns when the ray CLI is not the pinned minor version.
    script = (CLUSTER / "local-cluster.sh").read_text()
    minor = ".".join(ray_version.split(".")[:2])
    assert re.search(rf"^\s*{re.escape(minor)}\.\*\)", script, re.M), \
        f"local-cluster.sh does not accept Ray {minor}.x"


def test_gpu_pods_use_gpu_images_and_cpu_pods_cpu_images() -> None:
    for path, cluster in _kind("RayCluster"):
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"].get("workerGroupSpecs", [])]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                limits = container.get("resources", {}).get("limits", {})
                wants_gpu = "nvidia.com/gpu" in limits
                is_gpu = container["image"].endswith("-gpu")
                assert wants_gpu == is_gpu, f"{path.name}: {group.get('groupName', 'head')} " \
                                            f"runs {container['image']} with limits {limits}"
    launcher = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    docker = launcher["docker"]
    assert not docker["head_image"].endswith("-gpu")
    for name, node_type in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        image = node_type.get("docker", {}).get("worker_image", docker["worker_image"])
        gpu_instance = re.match(r"(g\d|p\d)", node_type["node_config"]["InstanceType"]) is not None
        assert image.endswith("-gpu") == gpu_instance, f"launcher node type {name}: {image}"


# ----------------------------------------------------------------------------- jobs named in the configs

def test_entrypoints_name_existing_jobs_and_flags() -> None:
    texts = {p: p.read_text() for p in TEXT_FILES}
    for path in YAML_FILES:  # folded YAML strings (a RayJob entrypoint) span lines without backslashes
        strings = [v for d in _docs(path) for _, v in _walk(d) if isinstance(v, str)]
        texts[path] += "\n" + "\n".join(strings)
    seen: set[str] = set()
    for path, text in texts.items():
        for module, args in _commands(text):
            seen.add(module)
            job = ROOT / (module.replace(".", "/") + ".py")
            assert job.is_file(), f"{path.relative_to(ROOT)} runs {module}, but {job.relative_to(ROOT)} does not exist"
            unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args)) - _config_flags(module)
            assert not unknown, f"{path.relative_to(ROOT)}: {module} has no flag(s) {sorted(unknown)}"
    assert {"jobs.train", "jobs.score"} <= seen


def test_rayjob_trains_and_cronjob_scores_incrementally() -> None:
    [(_, rayjob)] = _kind("RayJob")
    assert "python -m jobs.train" in rayjob["spec"]["entrypoint"]
    [(_, cron)] = _kind("CronJob")
    script = "\n".join(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "python -m jobs.score" in script
    assert "--incremental" in script and "--run-id" in script
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # Compaction and vacuum run after scoring, on the same results table, and only if scoring succeeded.
    assert "set -e" in script and script.index("python -m jobs.maintain") > script.index("python -m jobs.score")
    assert re.search(r'jobs\.maintain\s+\\\s*--results "\$\{SCORE_OUTPUT\}"', script)
    assert "exec ray job submit" not in script.split("python -m jobs.score")[0]  # an exec'd scoring never returns
    # The drift checks are their own step between scoring and maintenance; a failed check does not skip
    # maintenance (`|| CHECK_STATUS=$?`) and fails the Job at the end with jobs.report's exit code.
    report = script.index("python -m jobs.report")
    assert script.index("python -m jobs.score") < report < script.index("python -m jobs.maintain")
    assert re.search(r'--check "\$\{SCORE_CHECKS\}" \|\| CHECK_STATUS=\$\?', script)
    assert script.rstrip().endswith('exit "${CHECK_STATUS}"\nfi')


# ----------------------------------------------------------------------------- security and wiring

def test_token_auth_is_on_everywhere() -> None:
    [(_, cluster)] = _kind("RayCluster")
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]

    [(_, cron)] = _kind("CronJob")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}

    launcher = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(launcher[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start, key

    script = (CLUSTER / "local-cluster.sh").read_text()
    assert "RAY_AUTH_MODE=token" in script and "RAY_AUTH_TOKEN_PATH=" in script
    assert "ray stop" not in re.sub(r"#.*", "", script), "local-cluster.sh must not run `ray stop`"


def test_dashboard_is_not_exposed_and_no_keys_in_files() -> None:
    for path, doc in _all_docs():
        if not isinstance(doc, dict) or "kind" not in doc:
            continue
        assert doc["kind"] != "Ingress", f"{path.name}: an Ingress exposes the Ray dashboard / job API"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for path in YAML_FILES + [CLUSTER / "local-cluster.sh", CLUSTER / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name} holds an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key|aws_session_token", text), \
            f"{path.name} passes AWS keys; use the instance role / IRSA"


def test_kuberay_objects_point_at_the_cluster() -> None:
    [(_, cluster)] = _kind("RayCluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    [(_, rayjob)] = _kind("RayJob")
    assert rayjob["metadata"]["namespace"] == namespace
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    [(_, cron)] = _kind("CronJob")
    assert cron["metadata"]["namespace"] == namespace
    env = {e["name"]: e.get("value") for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == f"http://{name}-head-svc.{namespace}.svc.cluster.local:8265"
    accounts = {d["metadata"]["name"] for _, d in _kind("ServiceAccount")}
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert group["template"]["spec"]["serviceAccountName"] in accounts


def test_every_placeholder_is_substituted_by_the_documented_command() -> None:
    for path in YAML_FILES:
        text = path.read_text()
        used = set(PLACEHOLDER.findall(text))
        if not used:
            continue
        lists = ENVSUBST_LIST.findall(text)
        assert lists, f"{path.name} has placeholders {sorted(used)} but no `envsubst '...'` command in its header"
        listed = {v.lstrip("$") for v in lists[0].split()}
        assert used == listed, f"{path.name}: placeholders {sorted(used)}, envsubst substitutes {sorted(listed)}"
    # The README's apply commands substitute the same variables as each file's own header says.
    readme = (CLUSTER / "README.md").read_text()
    for variables, rel in re.findall(r"envsubst '([^']*)' < (cluster/\S+)", readme):
        header = ENVSUBST_LIST.findall((ROOT / rel).read_text())
        assert header and set(variables.split()) == set(header[0].split()), f"README.md: envsubst for {rel}"
