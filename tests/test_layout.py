"""The shape of the code: components/ is grouped by stage family, imports only go down the loop
(data <- semid <- ranker <- paper, the report on all of them; monitoring reads data and semid), there are no
import cycles, and every DVC stage depends on exactly the code it runs."""
import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = REPO / "components"
FAMILIES = ("data", "semid", "ranker", "monitoring", "paper")
# What each family may import besides the shared top-level modules and itself.
MAY_IMPORT = {"data": set(), "semid": {"data"}, "ranker": {"data", "semid"}, "monitoring": {"data", "semid"},
              "paper": {"data", "semid", "ranker"}}
ENTRY = "cli"  # the command line dispatches to every stage: the one top-level module allowed to import families
# The module(s) each stage's command runs (components/cli.py).
STAGE_MODULES = {
    "generate": ["components.data.world", "components.data.movielens"],
    "validate": ["components.data.validation"],
    "embed": ["components.semid.embedding"],
    "train_rqvae": ["components.semid.train_rqvae"],
    "backfill": ["components.semid.backfill"],
    "train_ranker": ["components.ranker.train_ranker"],
    "drift": ["components.monitoring.drift"],
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(COMPONENTS.rglob("*.py"))}


def imports(module: str) -> set[str]:
    """The components modules `module` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("components"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("components")}
    return {m for m in found if m in MODULES and m != "components"}


def family(module: str) -> str | None:
    """data / semid / ranker / monitoring / paper, or None for a shared top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[-1] in FAMILIES else None


def test_components_holds_the_families_and_the_shared_modules():
    packages = sorted(p.name for p in COMPONENTS.iterdir() if (p / "__init__.py").exists())
    assert set(packages) <= set(FAMILIES) and {"data", "semid", "ranker"} <= set(packages)
    for package in packages:  # a family exists only with code in it
        assert len(list((COMPONENTS / package).glob("*.py"))) > 1, f"components/{package} holds no module"


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[-1] != ENTRY])
def test_imports_only_go_down_the_loop(module):
    mine = family(module)
    allowed = {None} | ({mine} | MAY_IMPORT[mine] if mine else set())
    upward = sorted(m for m in imports(module) if family(m) not in allowed)
    assert not upward, f"{module} imports {upward}: {mine or 'a shared module'} may import only {allowed}"


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for child in sorted(imports(module)):
            assert state.get(child) != "open", "import cycle: " + " -> ".join(path + [module, child])
            if child not in state:
                visit(child, path + [module])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])


def closure(modules: list[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imports(module)
    return seen


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_each_stage_depends_on_its_package_and_the_modules_it_imports(stage):
    definition = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    assert definition["cmd"].split()[:2] == ["semid", stage]  # the stage and its command share a name
    code_deps = {d for d in definition["deps"] if d.startswith("components")}
    package = {family(m) for m in STAGE_MODULES[stage]}
    expected = {f"components/{p}" for p in package}
    expected |= {str(MODULES[m].relative_to(REPO)) for m in closure(STAGE_MODULES[stage]) if family(m) not in package}
    assert code_deps == expected
