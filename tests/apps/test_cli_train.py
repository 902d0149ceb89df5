"""``diffsynth train``: the arguments become a TrainingConfig, the run writes its weights, errors are one line."""

from __future__ import annotations

from safetensors import safe_open

from ds_cli.main import main


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SMALL = ("--steps", "2", "--height", "32", "--width", "32", "--mixed-precision", "no", "--device", "cpu")


def test_train_lora_writes_the_adapter_and_prints_its_path(flux_files, shapes_data, tmp_path, capsys):
    output = tmp_path / "run"
    common = ("--model", flux_files.repo, "--data", shapes_data, "--output", output, *SMALL, "--no-progress")
    code, out, err = run_main(capsys, "train", "lora", *common, "--rank", "4", "--lora-format", "kohya")
    assert code == 0, err
    path = out.strip().splitlines()[-1]
    assert path == str(output / "lora.safetensors")
    with safe_open(path, "pt") as file:
        keys = list(file.keys())
        metadata = file.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] in ("4", "4.0")


def test_train_full_writes_the_dit(flux_files, shapes_data, tmp_path, capsys):
    output = tmp_path / "full"
    common = ("--model", flux_files.repo, "--data", shapes_data, "--output", output, *SMALL, "--no-progress")
    code, out, err = run_main(capsys, "train", "full", *common, "--trainable", "dit")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(output / "dit.safetensors")
    with safe_open(output / "dit.safetensors", "pt") as file:
        assert any(key.startswith("double_blocks.0.") for key in file.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_train_errors_name_the_option(flux_files, tmp_path, capsys):
    base = ("train", "lora", "--model", flux_files.repo, "--output", tmp_path / "x")
    code, _, err = run_main(capsys, *base, "--data", tmp_path / "missing")
    assert code == 2 and "--data" in err and str(tmp_path / "missing") in err
    assert len(err.strip().splitlines()) == 2  # the usage line, then one line naming what to fix
    code, _, err = run_main(capsys, *base, "--data", tmp_path, "--height", "30")
    assert code == 2 and "height=30" in err
    code, _, err = run_main(capsys, "train", "lora", "--model", "m")
    assert code == 2 and "--data" in err
