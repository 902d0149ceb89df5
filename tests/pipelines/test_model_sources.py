"""What a model argument that is not a model says: a folder with junk in it, an empty diffusers folder, a random
file, an unknown name. Each error names the path or name and what is missing, instead of a FLUX.1-only message."""

from __future__ import annotations

import json

import pytest
import torch

from ds_pipelines import FluxImagePipeline, WanVideoPipeline, family_for
from tests.apps.test_cli import run_main


def test_a_junk_folder_is_named_with_what_it_holds_and_what_it_lacks(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "vae").mkdir()
    for pipeline in (FluxImagePipeline, WanVideoPipeline):
        with pytest.raises(ValueError) as error:
            pipeline.from_pretrained(tmp_path, device="cpu", torch_dtype=torch.float32)
        message = str(error.value)
        assert message.startswith(f"{tmp_path}: no files for ") and "tokenizer" in message, message
        assert "it holds: notes.txt, vae/" in message and "model folder holds" in message, message


def test_an_empty_diffusers_folder_names_the_missing_components(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert family_for(tmp_path).id == "flux.1"  # the folder says which family; its files are missing
    with pytest.raises(
        ValueError,
        match=(
            r"no files for tokenizer, text_encoder, tokenizer_2, text_encoder_2, dit, vae in this folder "
            r"\(it holds: model_index.json\); a FLUX.1 model folder holds"
        ),
    ):
        FluxImagePipeline.from_pretrained(tmp_path, device="cpu")


def test_a_random_file_or_name_is_not_sent_to_one_familys_loader(tmp_path, capsys):
    junk = tmp_path / "random.txt"
    junk.write_text("not a model")
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--model", junk, "-o", tmp_path / "o.png")
    assert code == 1 and "random.txt: no installed family recognises the DiT in this file" in err, err
    assert "FLUX.1 preset" not in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--model", "no-such-model", "-o", tmp_path / "o.png")
    assert code == 1 and "'no-such-model' is not a preset, a released model id or an existing path" in err, err
    assert "flux.1-dev" in err and "wan2.1-t2v-1.3b" in err  # the presets the user can choose from
