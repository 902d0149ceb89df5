"""Z-Image's VAE is FLUX.1's, reused from ds-models-flux through a declared dependency, never a copy."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import torch

import ds_models_z_image
from ds_loader import get_family
from ds_models_flux import VAE_SPEC, FluxVAE
from ds_pipelines.z_image import ZImagePipeline
from tests.pipelines.z_image_fixtures import z_image_files  # noqa: F401  (session fixture)

PACKAGE = Path(ds_models_z_image.__file__).parent


def test_the_loaded_vae_is_the_flux_vae_class(z_image_files):  # noqa: F811
    pipe = ZImagePipeline.from_pretrained(
        z_image_files.repo, device="cpu", torch_dtype=torch.float32, progress_bar=False
    )
    assert type(pipe.vae) is FluxVAE
    family = get_family("z-image")
    assert family.component_specs[VAE_SPEC.name] == "vae"
    for preset in family.presets.values():
        with torch.device("meta"):
            assert type(family.build_tiny_components(preset)["vae"]) is FluxVAE


def test_the_package_defines_no_vae_of_its_own_and_declares_the_reuse():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        classes = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        assert not [name for name in classes if "vae" in name.lower()], f"{path.name} defines {classes}"
    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["project"]
    assert any(requirement.startswith("ds-models-flux") for requirement in project["dependencies"])
