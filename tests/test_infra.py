"""infra/ checked where Docker and Kubernetes cannot run: every YAML and JSON parses, docker-compose.yml and
prefect.yaml name the same work pools, every image tag is pinned, the Dockerfile installs torch before the lock,
the work-pool templates are what Prefect accepts (and the gpu one holds one GPU); and the image's entrypoint, run
on a scratch repository, prepares a workspace."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
ENTRYPOINT = INFRA / "worker-entrypoint.sh"
TEMPLATES = INFRA / "prefect"
PROCESS_TEMPLATE = TEMPLATES / "process.json"
GPU_TEMPLATE = TEMPLATES / "gpu-kubernetes.json"

# What prefect-kubernetes (0.8.0, KubernetesWorkerJobConfiguration) requires of a job manifest
# (_get_base_job_manifest) and the keys of its default job_configuration: the package is not a dependency here.
K8S_REQUIRED_MANIFEST = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}
K8S_JOB_CONFIGURATION_KEYS = {"command", "env", "labels", "name", "annotations", "namespace", "job_manifest",
                              "cluster_config", "job_watch_timeout_seconds", "pod_watch_timeout_seconds",
                              "stream_output"}
# Images whose releases are major.minor (PostgreSQL since 10); every other tag needs major.minor.patch.
TWO_PART_RELEASES = {"postgres"}


def prefect_config() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def template(path: Path) -> dict:
    return json.loads(path.read_text())


def deployment_pools() -> dict[str, str]:
    """Each deployment of prefect.yaml -> its work pool."""
    return {d["name"]: d["work_pool"]["name"] for d in prefect_config()["deployments"]}


def locked(package: str) -> str:
    """The version requirements.lock pins for `package`."""
    found = re.search(rf"(?im)^{re.escape(package)}==(\S+)$", (REPO / "requirements.lock").read_text())
    assert found, f"requirements.lock pins no {package}"
    return found[1]


def is_pinned(image: str) -> bool:
    """Whether an image reference names one release: a digest, MinIO's RELEASE.<date>, or a full version
    (major.minor.patch; major.minor for PostgreSQL) - not latest, not a major or minor line that moves."""
    name, _, digest = image.partition("@")
    if digest:
        return bool(re.fullmatch(r"sha256:[0-9a-f]{64}", digest))
    repository, _, tag = name.rsplit("/", 1)[-1].partition(":")
    if "$" in image or not tag:
        return False
    if re.match(r"RELEASE\.\d{4}-\d{2}-\d{2}T", tag):
        return True
    version = re.match(r"\d+(\.\d+)*", tag)
    return bool(version) and version[0].count(".") + 1 >= (2 if repository in TWO_PART_RELEASES else 3)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        logical.append((keyword.upper(), args.strip()))
        current = ""
    return logical


def worker_pools(config: dict) -> dict[str, str]:
    """Compose service -> the pool its `prefect worker start --pool NAME` polls."""
    pools = {}
    for name, service in config["services"].items():
        command = service.get("command") or []
        command = command.split() if isinstance(command, str) else command
        if command[:3] == ["prefect", "worker", "start"]:
            pools[name] = command[command.index("--pool") + 1]
    return pools


def documented_templates() -> dict[str, set[str]]:
    """Pool -> the infra/prefect/ templates that prefect.yaml's comments and infra/README.md create it with."""
    found: dict[str, set[str]] = {}
    text = (REPO / "prefect.yaml").read_text() + (INFRA / "README.md").read_text()
    for line in re.findall(r"work-pool create .*", text):
        pool = line.split()[2]
        for path in re.findall(r"--base-job-template (infra/prefect/\S+)", line):
            found.setdefault(pool, set()).add(path)
    # prefect.yaml's gpu line continues on the next comment line
    for pool, path in re.findall(r"work-pool create (\S+) [^\n]*\n#[^\n]*--base-job-template (infra/prefect/\S+)",
                                 text):
        found.setdefault(pool, set()).add(path.rstrip(")"))
    return found


def test_every_yaml_of_the_repository_parses():
    tracked = subprocess.run(["git", "ls-files", "*.yml", "*.yaml", "dvc.lock"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    paths = sorted(path for path in {*tracked, str(COMPOSE.relative_to(REPO)), "infra/prefect/automations.yaml"}
                   if (REPO / path).exists())  # a tracked file deleted in the working tree is not there to parse
    assert {"prefect.yaml", "dvc.yaml", "infra/docker-compose.yml"} <= set(paths)
    broken = {}
    for path in paths:
        try:
            if yaml.safe_load((REPO / path).read_text()) is None:
                broken[path] = "empty"
        except yaml.YAMLError as exc:
            broken[path] = str(exc).splitlines()[0]
    assert not broken, f"YAML files that do not parse: {broken}"


def test_every_work_pool_template_parses_as_a_template():
    paths = sorted(TEMPLATES.glob("*.json"))
    assert {PROCESS_TEMPLATE, GPU_TEMPLATE} <= set(paths)
    for path in paths:
        content = template(path)
        assert set(content) == {"job_configuration", "variables"}, f"{path}: not a base job template"
        assert content["variables"]["type"] == "object" and content["variables"]["properties"], path


def test_compose_workers_and_prefect_yaml_name_the_same_pools():
    pools = set(deployment_pools().values())
    workers = worker_pools(compose())
    templates = documented_templates()
    assert pools == {"semid-process", "gpu"}, pools
    assert "semid-process" in workers.values(), f"no compose worker polls semid-process: {workers}"
    for pool in pools:
        assert pool in workers.values() or pool in templates, f"pool {pool}: no compose worker, no template"
    stray = {service: pool for service, pool in workers.items() if pool not in pools}
    assert not stray, f"compose workers poll pools no deployment uses: {stray}"
    stray = set(templates) - pools
    assert not stray, f"templates documented for pools no deployment uses: {stray}"
    for pool, paths in templates.items():
        for path in paths:
            assert (REPO / path).is_file(), f"{pool}: the documented template {path} does not exist"
    assert templates.get("semid-process") == {"infra/prefect/process.json"}
    assert templates.get("gpu") == {"infra/prefect/gpu-kubernetes.json"}


def test_compose_services_wire_up():
    services = compose()["services"]
    assert {"postgres", "prefect-server", "minio", "minio-bucket", "worker"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
        if "build" in service:
            assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
                DOCKERFILE, f"{name} is not built from infra/Dockerfile"
    server = services["prefect-server"]
    assert "postgresql+asyncpg://" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for name in worker_pools({"services": services}):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000", name
        assert services[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy", name
        assert services[name]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully", name
        bucket = re.fullmatch(r"s3://([^/]+)/.+", env["SEMID_STORAGE_ROOT"])[1]
        assert f"mc mb --ignore-existing semid/{bucket}" in " ".join(services["minio-bucket"]["command"]), \
            f"the bucket {bucket} of {name}'s storage root is not created"
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_compose_holds_no_secrets():
    """Every password or secret key is taken from the environment, with no default to fall back on."""
    found = 0
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                found += 1
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}: {key} is not ${{VAR:?message}}"
            if key == "PREFECT_API_DATABASE_CONNECTION_URL":
                assert re.search(r"://\w+:\$\{POSTGRES_PASSWORD:\?[^}]+\}@", value), f"{name}: {key}"
    assert found >= 4


def test_is_pinned_tells_floating_tags_from_releases():
    assert is_pinned("postgres:16.10-bookworm")
    assert is_pinned("minio/minio:RELEASE.2025-04-22T22-12-26Z")
    assert is_pinned("python@sha256:" + "a" * 64)
    assert is_pinned("prefecthq/prefect:3.9.1-python3.11") and is_pinned("semid-worker:0.1.0-cu128")
    for floating in ("postgres", "postgres:latest", "postgres:16", "prefecthq/prefect:3-latest", "python:3.11-slim",
                     "prefecthq/prefect:3.9-python3.11", "localhost:5000/semid", "python:${PYTHON_VERSION}-slim"):
        assert not is_pinned(floating), floating


def test_every_image_tag_is_pinned():
    images = [service["image"] for service in compose()["services"].values() if "image" in service]
    images += [args.split()[0] for keyword, args in instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(images) >= 6, images
    floating = [image for image in images if not is_pinned(image)]
    assert not floating, f"images without a pinned release tag: {floating}"


def test_images_match_the_tested_versions():
    """The server runs the lock's prefect; the worker's Python is the one pyproject.toml allows."""
    server = compose()["services"]["prefect-server"]["image"]
    assert server == f"prefecthq/prefect:{locked('prefect')}-python3.11"
    assert prefect_config()["prefect-version"] == locked("prefect")
    (base,) = [args.split()[0] for keyword, args in instructions(DOCKERFILE) if keyword == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    assert 'requires-python = ">=3.11,<3.12"' in (REPO / "pyproject.toml").read_text()


def test_dockerfile_installs_torch_before_the_lock():
    steps = instructions(DOCKERFILE)
    torch = f"torch=={locked('torch')}"
    assert re.search(rf"pip install -q {re.escape(torch)}$", (REPO / "Makefile").read_text(), re.M), \
        "the Makefile installs another torch"
    runs = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "RUN"]
    torch_runs = [i for i, args in runs if re.search(rf"pip install .*{re.escape(torch)}(\s|$)", args)]
    lock_runs = [i for i, args in runs if re.search(r"pip install .*-r \S*requirements\.lock", args)]
    assert torch_runs and lock_runs, f"no RUN installs {torch} or -r requirements.lock"
    assert torch_runs[0] < lock_runs[0], "the lock is installed before torch"
    assert "requirements.lock" not in steps[torch_runs[0]][1]
    assert '--index-url "$TORCH_INDEX_URL"' in steps[torch_runs[0]][1]
    (arg,) = [args for keyword, args in steps if keyword == "ARG" and args.startswith("TORCH_INDEX_URL=")]
    assert arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    copies = [i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and "requirements.lock" in args]
    code = [i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and re.search(r"\s\.\s", args)]
    assert copies and copies[0] < lock_runs[0] < code[0], "the lock is not installed before the code is copied"


def test_dockerfile_environment_user_and_entrypoint():
    steps = instructions(DOCKERFILE)
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "DVC_NO_ANALYTICS=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert re.search(rf"(^|\s){setting}(\s|$)", env), f"the image does not set {setting}"
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"the image runs as {users[-1:] or 'root'}"
    assert any(keyword == "RUN" and re.search(r"apt-get install .*\bgit\b", args) for keyword, args in steps)
    (entrypoint,) = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint[-1] == "/opt/semid/infra/worker-entrypoint.sh" and ENTRYPOINT.is_file()
    (cmd,) = [json.loads(args) for keyword, args in steps if keyword == "CMD"]
    assert cmd[cmd.index("--pool") + 1] == "semid-process"


def test_dockerignore_keeps_git_and_drops_environments_and_secrets():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.rstrip("/") in (".git", "**/.git", "*") for p in patterns), "the image needs .git"
    for needed in (".venv/", "data/", ".dvc/cache/", ".env", ".dvc/config.local"):
        assert needed in patterns, f".dockerignore does not drop {needed}"


def test_process_template_is_prefects_with_the_loops_defaults():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    ours, default = template(PROCESS_TEMPLATE), ProcessWorker.get_default_base_job_template()
    WorkPoolCreate(name="semid-process", type="process", base_job_template=ours)  # what the server validates
    assert ours["job_configuration"] == default["job_configuration"]
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    for name, schema in default["variables"]["properties"].items():
        differs = {k for k in schema.keys() | ours["variables"]["properties"][name].keys()
                   if schema.get(k) != ours["variables"]["properties"][name].get(k)}
        assert differs <= {"default", "description", "title"}, f"variable {name}: {differs} changed"
    defaults = {name: schema["default"] for name, schema in ours["variables"]["properties"].items()
                if "default" in schema}
    configuration = ProcessJobConfiguration(**apply_values(ours["job_configuration"], defaults))
    assert configuration.env == {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}


def test_gpu_template_runs_each_flow_run_as_a_job_holding_one_gpu():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    ours = template(GPU_TEMPLATE)
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=ours)
    assert K8S_JOB_CONFIGURATION_KEYS <= set(ours["job_configuration"])

    def contains(whole, part) -> bool:
        if isinstance(part, dict):
            return isinstance(whole, dict) and all(k in whole and contains(whole[k], v) for k, v in part.items())
        if isinstance(part, list):
            return isinstance(whole, list) and len(whole) >= len(part) and all(map(contains, whole, part))
        return whole == part

    manifest = ours["job_configuration"]["job_manifest"]
    assert contains(manifest, K8S_REQUIRED_MANIFEST), "prefect-kubernetes would reject the job manifest"
    (ranker,) = [d for d in prefect_config()["deployments"] if d["work_pool"]["name"] == "gpu"]
    job_variables = ranker["work_pool"]["job_variables"]
    validate(job_variables, ours["variables"], raise_on_error=True, preprocess=True, ignore_required=True)

    properties = ours["variables"]["properties"]
    values = {name: schema["default"] for name, schema in properties.items() if "default" in schema}
    rendered = apply_values(ours["job_configuration"], {**values, **job_variables})
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert rendered["env"] == {"CUDA_VISIBLE_DEVICES": "0"}
    assert is_pinned(container["image"]) and container["image"].startswith("semid-worker:")
    assert container["image"] == compose()["services"]["gpu-worker"]["image"]
    assert {"name": "SEMID_REPO", "value": "/workspace/semid"} in container["env"]
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == properties["workspace_claim"]["default"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/workspace"}]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_deployments_job_variables_fit_every_template_of_their_pool():
    """A gpu pool is either a process pool (one GPU host) or the Kubernetes one: the ranker's env fits both."""
    from prefect.utilities.schema_tools import validate

    for deployment in prefect_config()["deployments"]:
        job_variables = deployment["work_pool"].get("job_variables", {})
        for path in (PROCESS_TEMPLATE, GPU_TEMPLATE):
            validate(job_variables, template(path)["variables"], raise_on_error=True, preprocess=True,
                     ignore_required=True)


def scratch_source(tmp_path: Path, params: str) -> Path:
    """A committed repository holding `params` as params.yaml and the repository's DVC config."""
    source = tmp_path / "source"
    (source / ".dvc").mkdir(parents=True)
    (source / "params.yaml").write_text(params)
    for name in ("config", ".gitignore"):
        (source / ".dvc" / name).write_text((REPO / ".dvc" / name).read_text())
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=source, check=True)
    return source


def entrypoint(source: Path, workspace: Path, *command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *command], capture_output=True, text=True, env={
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SEMID_SOURCE": str(source), "SEMID_REPO": str(workspace), **env})


def git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout


def test_entrypoint_refuses_params_without_a_storage_root(tmp_path):
    source = scratch_source(tmp_path, "data:\n  source: synthetic\n")
    proc = entrypoint(source, tmp_path / "ws" / "semid", "true", SEMID_STORAGE_ROOT="s3://semid/lake")
    assert proc.returncode != 0
    assert "has no storage.root to set to s3://semid/lake" in proc.stderr


@pytest.mark.integration
def test_entrypoint_clones_sets_the_storage_root_and_runs_the_command(tmp_path):
    params = (REPO / "params.yaml").read_text()
    assert re.search(r"(?m)^storage:\n(?:\s*#.*\n)*  root: data$", params), "params.yaml: no storage.root: data"
    source, workspace = scratch_source(tmp_path, params), tmp_path / "ws" / "semid"
    proc = entrypoint(source, workspace, "sh", "-c", 'echo "$PWD $PYTHONPATH"', SEMID_STORAGE_ROOT="s3://semid/lake")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(workspace), str(workspace)]  # runs in the workspace, its code first
    assert yaml.safe_load((workspace / "params.yaml").read_text())["storage"]["root"] == "s3://semid/lake"
    assert (workspace / "params.yaml").read_text().replace('"s3://semid/lake"', "data") == params  # comments kept
    assert "url = s3://semid/lake/dvc" in (workspace / ".dvc" / "config").read_text()
    assert git(workspace, "status", "--porcelain") == ""  # committed, in the workspace only
    assert len(git(workspace, "log", "--oneline").splitlines()) == 2
    assert git(source, "log", "--oneline").count("\n") == 1
    assert subprocess.run(["git", "rev-parse", "@{upstream}"], cwd=workspace, capture_output=True).returncode != 0

    again = entrypoint(source, workspace, "true", SEMID_STORAGE_ROOT="s3://semid/lake")
    assert again.returncode == 0, again.stderr
    assert "cloning" not in again.stderr
    assert len(git(workspace, "log", "--oneline").splitlines()) == 2  # nothing new to commit
