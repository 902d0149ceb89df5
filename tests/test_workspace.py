"""The workspace keeps its promises: who may import whom, and packages that install and work alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = sorted(p.parent for p in [*ROOT.glob("packages/*/pyproject.toml"), *ROOT.glob("apps/*/pyproject.toml")])
# Every family package (ds-models-* but the core), found on disk, so a new family needs no line here.
FAMILIES = tuple(
    sorted(
        path.parent.name.replace("-", "_")
        for path in ROOT.glob("packages/ds-models-*/pyproject.toml")
        if path.parent.name != "ds-models-core"
    )
)

# "Who may import whom" from DESIGN.md, for our own packages. A family may import another family only for a
# component it really reuses; those pairs are listed here explicitly when they arise.
ALLOWED: dict[str, set[str]] = {
    "ds_vram": set(),
    "ds_loader": {"ds_vram"},
    "ds_models_core": set(),
    **{family: {"ds_models_core", "ds_loader", "ds_vram"} for family in FAMILIES},
    "ds_pipelines": {"ds_models_core", "ds_loader", "ds_vram", *FAMILIES},
    "ds_train": {"ds_pipelines"},
    "ds_cli": {"ds_pipelines", "ds_train"},
    "ds_notebook": {"ds_pipelines", "ds_train"},
}
# A family may import another family's PUBLIC component that a release really reuses: (importer, reused family) ->
# the reused family's modules it may import from. Never a private name, never a cycle, never a copy (DESIGN.md).
REUSED_COMPONENTS: dict[tuple[str, str], set[str]] = {
    ("ds_models_z_image", "ds_models_flux"): {"ds_models_flux", "ds_models_flux.vae"},
    ("ds_models_qwen_image", "ds_models_wan"): {"ds_models_wan", "ds_models_wan.vae"},
}
REUSED_FAMILIES = set(REUSED_COMPONENTS)
# Import names whose distribution is named differently.
DISTRIBUTION_OF = {"PIL": "pillow", "huggingface_hub": "huggingface-hub", "yaml": "pyyaml", "cv2": "opencv-python"}


def import_name(member: Path) -> str:
    return next((member / "src").iterdir()).name


def distribution(module: str) -> str:
    return DISTRIBUTION_OF.get(module, module.replace("_", "-"))


def imports(member: Path) -> tuple[set[str], set[str]]:
    """Top-level modules imported by a package: (at module level, anywhere including inside functions)."""
    required, everywhere = set(), set()
    for path in (member / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            roots = {name.split(".")[0] for name in names}
            everywhere |= roots
            if id(node) in top_level:
                required |= roots
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    own = import_name(member)
    return required - stdlib - {own}, everywhere - stdlib - {own}


def declared(member: Path) -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((member / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_requirement_name(r) for r in requirements}

    extras = {extra: names(reqs) for extra, reqs in project.get("optional-dependencies", {}).items()}
    return names(project.get("dependencies", [])), extras


def _requirement_name(requirement: str) -> str:
    requirement = requirement.strip()
    for separator in "<>=!~[; ":
        requirement = requirement.split(separator)[0]
    return requirement.strip().lower().replace("_", "-")


@pytest.mark.parametrize("member", MEMBERS, ids=lambda p: p.name)
def test_imports_follow_the_layering(member):
    own = import_name(member)
    assert own in ALLOWED, f"{member.name}: add {own} to the layering table in DESIGN.md and this test"
    _, everywhere = imports(member)
    ours = {name for name in everywhere if name.startswith("ds_")}
    forbidden = {name for name in ours - ALLOWED[own] if (own, name) not in REUSED_FAMILIES}
    assert not forbidden, f"{own} may not import {sorted(forbidden)} (DESIGN.md, 'Who may import whom')"


def imported_names(member: Path) -> list[tuple[Path, str, list[str]]]:
    """Every ``import m`` / ``from m import a, b`` of a package: (file, module, names)."""
    found = []
    for path in (member / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.extend((path, alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path, node.module, [alias.name for alias in node.names]))
    return found


FAMILY_MEMBERS = [member for member in MEMBERS if import_name(member) in FAMILIES]


@pytest.mark.parametrize("member", FAMILY_MEMBERS, ids=lambda p: p.name)
def test_a_family_reuses_another_only_through_declared_public_modules(member):
    own = import_name(member)
    for path, module, names in imported_names(member):
        other = module.split(".")[0]
        if other not in FAMILIES or other == own:
            continue
        where = f"{path.relative_to(ROOT)}: {own} imports {module}"
        allowed = REUSED_COMPONENTS.get((own, other))
        assert allowed is not None, f"{where}, which is not a declared reuse (REUSED_COMPONENTS)"
        assert module in allowed, f"{where}; only {sorted(allowed)} are declared for this reuse"
        private = [name for name in [*module.split("."), *names] if name.startswith("_")]
        assert not private, f"{where}: private names {private} (reuse public components only)"
        assert (other, own) not in REUSED_COMPONENTS, f"{own} and {other} reuse each other: a cycle"


def test_the_reuse_table_has_no_cycles():
    for importer, reused in REUSED_COMPONENTS:
        assert (reused, importer) not in REUSED_COMPONENTS, f"{importer} <-> {reused}"
        assert all(module.split(".")[0] == reused for module in REUSED_COMPONENTS[(importer, reused)])


@pytest.mark.parametrize("member", MEMBERS, ids=lambda p: p.name)
def test_declared_dependencies_are_exactly_the_imports(member):
    required_imports, all_imports = imports(member)
    requirements, extras = declared(member)
    optional = set().union(*extras.values()) if extras else set()
    undeclared = {distribution(m) for m in required_imports} - requirements
    assert not undeclared, f"{member.name} imports {sorted(undeclared)} at module level without declaring them"
    unused = requirements - {distribution(m) for m in all_imports}
    assert not unused, f"{member.name} declares {sorted(unused)} but never imports them"
    lazily = {distribution(m) for m in all_imports - required_imports if m.startswith("ds_")}
    assert lazily <= requirements | optional, f"{member.name} imports {sorted(lazily)} without an extra"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    built = {}
    for member in MEMBERS:
        name = tomllib.loads((member / "pyproject.toml").read_text())["project"]["name"]
        command = ["uv", "build", "--package", name, "--wheel", "--no-build-isolation", "--out-dir", str(out)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        built[name] = next(out.glob(f"{name.replace('-', '_')}-*.whl"))
    return built


@pytest.mark.slow
def test_wheels_declare_what_their_packages_import(wheels):
    for member in MEMBERS:
        name = tomllib.loads((member / "pyproject.toml").read_text())["project"]["name"]
        with zipfile.ZipFile(wheels[name]) as archive:
            metadata_path = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = archive.read(metadata_path).decode()
            files = archive.namelist()
        required = {
            _requirement_name(line.split(":", 1)[1])
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        }
        assert required == declared(member)[0], name
        assert any(f.startswith(f"{import_name(member)}/__init__.py") for f in files), name


@pytest.mark.slow
def test_ds_vram_works_with_nothing_else_of_ours(wheels, tmp_path):
    """Only the ds-vram wheel and third-party site-packages on the path (no .pth files, so no editable installs)."""
    with zipfile.ZipFile(wheels["ds-vram"]) as archive:
        archive.extractall(tmp_path / "site")
    code = f"""
import sys
sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + [{str(tmp_path / "site")!r},
    {sysconfig.get_paths()["purelib"]!r}]
import torch, ds_vram
assert ds_vram.__file__.startswith({str(tmp_path)!r}), ds_vram.__file__
for other in ("ds_loader", "ds_models_core", "ds_pipelines"):
    try:
        __import__(other)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(other + " is importable: the check is not isolated")
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
x = torch.randn(3, 8)
expected = model(x)
ds_vram.enable_vram_management(model, ds_vram.VRAMConfig(storage="cpu", computation_device="cpu",
                                                         computation_dtype=torch.float32, vram_limit=0))
assert torch.equal(model(x), expected)
print("ok")
"""
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
