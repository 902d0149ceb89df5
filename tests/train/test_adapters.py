"""Training adapters come from the family registry: options each family declares, checked by name and type, one
flag per option in the CLI, and random inputs of the shapes each adapter's prediction step feeds its DiT."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Literal

import pytest
import torch

import ds_pipelines
from ds_train import (
    TrainingAdapter,
    TrainingConfig,
    adapter_for,
    declared_family_options,
    get_adapter,
    parse_option_value,
)
from ds_train.flux import FluxTrainingAdapter
from ds_train.wan import WanTrainingAdapter


def test_each_registered_family_names_its_adapter_and_options():
    for family in ds_pipelines.list_families():
        adapter = family.training_adapter_class()
        assert issubclass(adapter, TrainingAdapter) and adapter.family == family.id
        assert get_adapter(family.id).default_size == tuple(family.default_size)
    declared = declared_family_options()
    assert declared["expert"].choices == ("high_noise", "low_noise") and declared["expert"].families == ("wan",)
    assert declared["guidance"].type is float and declared["guidance"].families == ("flux.1",)
    assert declared["first_frame_conditioning"].type is bool


def test_options_are_checked_by_name_and_type():
    adapter = get_adapter("wan", sigma_shift=3.0, expert="high_noise", boundary=None)
    assert isinstance(adapter, WanTrainingAdapter) and adapter.expert == "high_noise" and adapter.sigma_shift == 3.0
    assert adapter.boundary is None  # None keeps an option's default
    flux = get_adapter("flux.1", guidance=3)  # an int is a fine float
    assert isinstance(flux, FluxTrainingAdapter) and flux.guidance == 3
    with pytest.raises(ValueError, match=r"'t5_sequence_length' is not one Wan \('wan'\) takes; it takes: expert"):
        get_adapter("wan", t5_sequence_length=256)
    with pytest.raises(ValueError, match=r"first_frame_conditioning='yes' \(wan\) must be bool"):
        get_adapter("wan", first_frame_conditioning="yes")
    with pytest.raises(
        ValueError, match=r"TrainingConfig\.family='no-such-family': unknown model family .*installed: "
    ):
        adapter_for(TrainingConfig(family="no-such-family"))
    with pytest.raises(ValueError, match=r"'expert' is not one FLUX\.1 \('flux\.1'\) takes; it takes: guidance"):
        adapter_for(TrainingConfig(family="flux.1", family_options={"expert": "low_noise"}))
    with pytest.raises(ValueError, match=r"TrainingConfig\.family_options=.* must map option names"):
        TrainingConfig(family_options={1: 2})


def test_command_line_values_parse_by_declared_type():
    assert parse_option_value(bool, "true") is True and parse_option_value(bool, "0") is False
    assert parse_option_value(float, "3.5") == 3.5 and parse_option_value(int, "256") == 256
    assert parse_option_value(Literal["high_noise", "low_noise"], "low_noise") == "low_noise"
    with pytest.raises(ValueError, match="use one of high_noise, low_noise"):
        parse_option_value(Literal["high_noise", "low_noise"], "middle")
    with pytest.raises(ValueError, match="'x' is not a float"):
        parse_option_value(float, "x")
    with pytest.raises(ValueError, match="'nan' is not a finite number"):
        parse_option_value(float, "nan")


def test_one_option_name_with_two_types_is_an_error(monkeypatch):
    class Other(TrainingAdapter):
        family = "other"
        options = {"guidance": (int, "an integer guidance")}  # noqa: RUF012

    fake = [ds_pipelines.get_family("flux.1"), SimpleNamespace(id="other", training_adapter_class=lambda: Other)]
    monkeypatch.setattr(ds_pipelines, "list_families", lambda: fake)
    with pytest.raises(TypeError, match=r"'guidance' is float for flux\.1 but int for other"):
        declared_family_options()


def test_the_cli_makes_a_flag_of_each_option(tmp_path):
    from ds_cli.train import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["train", "lora", "--model", "m", "--data", str(tmp_path), "--output", str(tmp_path / "run")]
    args = parser.parse_args([*base, "--expert", "low_noise", "--first-frame-conditioning", "--guidance", "2.5"])
    options = config_from_args(args).family_options
    assert options == {"expert": "low_noise", "first_frame_conditioning": True, "guidance": 2.5}
    args = parser.parse_args([*base, "--family-option", "t5-sequence-length=128", "--family-option", "boundary=0.9"])
    assert config_from_args(args).family_options == {"t5_sequence_length": 128, "boundary": 0.9}
    assert config_from_args(parser.parse_args(base)).family_options == {}
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        parser.parse_args([*base, "--expert", "middle"])
    from ds_cli.common import UsageError

    with pytest.raises(UsageError, match=r"--family-option colour=red: .* takes: .*guidance, t5_sequence_length"):
        config_from_args(parser.parse_args([*base, "--family-option", "colour=red"]))
    with pytest.raises(UsageError, match=r"--family-option boundary: 'high' is not a float"):
        config_from_args(parser.parse_args([*base, "--family-option", "boundary=high"]))


@pytest.mark.parametrize(
    ("family", "config", "frames", "conditions"),
    [
        ("flux.1", "tiny", None, {"text", "pooled"}),
        ("wan", "tiny", 2, {"context"}),
        ("wan", "tiny-i2v", 2, {"context", "condition", "clip_feature"}),
        ("wan", "tiny-flf2v", 2, {"context", "condition", "clip_feature"}),
    ],
)
def test_random_inputs_run_through_the_prediction_step(family, config, frames, conditions):
    from ds_models_flux import FluxDiT, FluxDiTConfig
    from ds_models_wan import WanDiT, WanDiTConfig

    model = FluxDiT(FluxDiTConfig.preset(config)) if family == "flux.1" else WanDiT(WanDiTConfig.preset(config))
    adapter = get_adapter(family)
    latents, given = adapter.random_inputs(model.eval(), 2, (4, 6), frames, 5, torch.Generator().manual_seed(0))
    assert latents.shape[:2] == (2, 16) and latents.shape[-2:] == (4, 6) and set(given) == conditions
    with torch.no_grad():
        velocity = adapter.predict(model, latents, torch.tensor([0.3, 0.8]), given)
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()


def test_a_non_finite_number_in_the_config_names_the_field():
    from ds_train import TrainingConfig

    for name in ("learning_rate", "caption_dropout", "max_grad_norm"):
        with pytest.raises(ValueError, match=rf"TrainingConfig.{name}=nan must be a finite number"):
            TrainingConfig(data="x", **{name: float("nan")})


def test_a_diverged_loss_is_strict_json_in_the_checkpoint_and_reads_back(tmp_path):
    import json

    from ds_train.checkpoint import finish_checkpoint, read_checkpoint

    state = {"step": 2, "losses": [0.5, float("nan")]}
    path = finish_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"state": {}}, state, keep=2)
    text = (path / "state.json").read_text()
    assert "NaN" not in text and json.loads(text)["losses"] == [0.5, "nan"]  # strict JSON
    _, _, read = read_checkpoint(path)
    losses = [float(loss) for loss in read["losses"]]
    assert losses[0] == 0.5 and losses[1] != losses[1]  # NaN again
