"""`diffsynth` as a user runs it: a subprocess on tiny weights (exit codes, one-line errors, files), plus
in-process runs of ``ds_cli.main.main`` for the many cheap checks (each subprocess costs seconds of imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from PIL import Image
from safetensors.torch import save_file

from ds_cli.common import free_paths
from ds_cli.main import main

TINY = ["--height", "64", "--width", "64", "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--quiet"]


def diffsynth(*args: object, cwd=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ds_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=environment,
    )


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def kohya_lora(path, layers=("double_blocks.0.img_attn.qkv",), rank=2, width=64, out=192):  # tiny DiT qkv
    state = {}
    for layer in layers:
        name = "lora_unet_" + layer.replace(".", "_")
        state[f"{name}.lora_down.weight"] = torch.randn(rank, width) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank) * 0.1
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, path, metadata={"ss_network_dim": str(rank)})
    return path


def metadata(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.info["diffsynth"])


def test_generate_as_a_subprocess_counts_seeds_and_records_metadata(flux_files, tmp_path):
    output = tmp_path / "cat.png"
    lora = kohya_lora(tmp_path / "ink.safetensors")
    model = ["--model", flux_files.bfl_repo, "--prompt", "the cat", "-o", output, *TINY]
    first = diffsynth(
        "generate", *model, "--count", "2", "--seed", "4", "--lora", f"{lora}:0.5", "--fp8", "--vram-limit", "0"
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(output), str(tmp_path / "cat-1.png")]
    assert [metadata(p)["seed"] for p in first.stdout.split()] == [4, 5]
    recorded = metadata(output)
    assert recorded["prompt"] == "the cat" and recorded["loras"] == [{"file": "ink.safetensors", "scale": 0.5}]
    with Image.open(output) as image:
        assert image.size == (64, 64) and "the cat" in image.info["parameters"]
    usage = diffsynth("generate", "--negative-prompt", "x")  # fails in argparse, before any heavy import
    assert usage.returncode == 2 and "the following arguments are required: --prompt" in usage.stderr


def test_generate_never_overwrites_unless_asked_and_errors_are_one_line(flux_files, capsys, tmp_path):
    output = tmp_path / "cat.png"
    output.write_bytes(b"not mine")
    model = ["generate", "--model", flux_files.bfl_repo, "--prompt", "the cat", "-o", output, *TINY]
    code, out, err = run_main(capsys, *model, "--seed", "9")
    assert code == 0 and out.strip() == str(tmp_path / "cat-1.png") and output.read_bytes() == b"not mine", err
    code, out, _ = run_main(capsys, *model, "--seed", "9", "--overwrite", "--storage", "disk", "--vram-limit", "0")
    assert code == 0 and out.strip() == str(output) and metadata(output)["seed"] == 9
    code, _, err = run_main(capsys, *model[: -len(TINY)], *TINY[:3], "72", *TINY[4:])
    assert code == 1
    assert err == "diffsynth: error: width=72 is not a multiple of 16; the nearest valid sizes are 64 and 80\n"
    code, _, err = run_main(capsys, "--debug", "generate", "--model", tmp_path / "nowhere", "--prompt", "x", *TINY)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("diffsynth: error:")


def test_usage_errors_exit_2_before_loading_anything(capsys, tmp_path):
    code, _, err = run_main(capsys, "generate")
    assert code == 2 and "--prompt" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "-o", tmp_path / "x.jpg")
    assert code == 2 and err.strip().endswith(
        "--output " + str(tmp_path / "x.jpg") + ": images are written as PNG; use a .png name"
    )
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--count", "0")
    assert code == 2 and "argument --count: must be an integer of at least 1, not 0" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--strength", "0.5")
    assert code == 2 and "--strength needs --input-image" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--frames", "33")
    assert code == 2 and "this model makes images" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--input-image", tmp_path / "none.png")
    assert code == 1 and err.strip() == f"diffsynth: error: --input-image {tmp_path / 'none.png'}: no such file"
    code, _, err = run_main(capsys, "vram", "--model", "flux.1-dev", "--gpu-memory", "-1")
    assert code == 2 and "argument --gpu-memory: must be a number above 0, not -1" in err
    code, _, err = run_main(capsys, "nonsense")
    assert code == 2


def test_help_everywhere_has_examples(capsys):
    for command in ([], ["generate"], ["models"], ["models", "list"], ["lora"], ["lora", "convert"], ["vram"]):
        code, out, _ = run_main(capsys, *command, "--help")
        assert code == 0 and "examples:" in out, command


def test_errors_are_red_only_when_colour_is_allowed(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    _, _, err = run_main(capsys, "lora", "inspect", "missing.safetensors")
    assert "\033[31mdiffsynth: error:\033[0m" in err
    monkeypatch.setenv("NO_COLOR", "1")
    code, _, err = run_main(capsys, "lora", "inspect", "missing.safetensors")
    assert code == 1 and err == "diffsynth: error: LoRA file not found: missing.safetensors\n"


def test_models_list_inspect_download_and_vram(flux_files, capsys, tmp_path, monkeypatch):
    code, out, err = run_main(capsys, "models", "list", "--family", "flux.1")
    assert code == 0 and "~ estimated: no GPU measurement recorded yet" in err  # none shipped yet
    header, _, *rows = out.splitlines()
    assert header.split() == [
        "name",
        "family",
        "kind",
        "params",
        "bf16",
        "weights",
        "resident",
        "offload",
        "fp8",
        "stream",
    ]
    dev = next(row.split() for row in rows if row.startswith("flux.1-dev "))
    assert dev[:4] == ["flux.1-dev", "flux.1", "image", "16.87B"] and dev[5] == "GiB" and dev[6].startswith("~")
    code, out, _ = run_main(capsys, "models", "inspect", flux_files.bfl_repo / "flux1-dev.safetensors")
    assert code == 0 and all(word in out for word in ("flux", "dit", "bfl", "depth_single_blocks=2"))
    code, out, _ = run_main(capsys, "vram", "--model", "flux.1-dev", "--gpu-memory", "8")
    assert code == 0 and "setting    stream" in out and "cli flags  --storage cpu --fp8 --vram-limit" in out
    code, out, _ = run_main(capsys, "vram", "--model", "black-forest-labs/FLUX.1-dev", "--gpu-memory", "80")
    assert code == 0 and "setting    resident" in out
    code, _, err = run_main(capsys, "vram", "--model", "flux.9", "--gpu-memory", "8")
    assert code == 1 and err.startswith("diffsynth: error: unknown model 'flux.9'")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    code, _, err = run_main(capsys, "models", "download", "flux.1-schnell")
    assert code == 1 and "does not exist and downloads are skipped" in err


def test_lora_inspect_and_convert_round_trip(capsys, tmp_path):
    lora = kohya_lora(
        tmp_path / "style.safetensors", layers=("double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv")
    )
    code, out, _ = run_main(capsys, "lora", "inspect", lora)
    assert code == 0
    assert (
        "format      kohya" in out and "rank        2" in out and "lora_unet_double_blocks_*_img_attn_qkv  x2" in out
    )
    assert "ss_network_dim" in out
    code, _, err = run_main(capsys, "lora", "convert", lora, "--to", "diffusers", "-o", tmp_path / "x.bin")
    assert code == 2 and "written as .safetensors" in err
    code, _, err = run_main(capsys, "lora", "merge", lora, lora, "--weights", "1", "-o", tmp_path / "m.safetensors")
    assert code == 2 and "--weights has 1 values for 2 files" in err
    import ds_pipelines

    code, out, _ = run_main(capsys, "lora", "convert", lora, "--to", "comfyui")
    converted = tmp_path / "style-comfyui.safetensors"
    assert code == 0 and out.strip() == str(converted)
    code, out, _ = run_main(capsys, "lora", "inspect", converted)
    assert code == 0 and "format      comfyui" in out and "rank        2" in out
    code, _, err = run_main(capsys, "lora", "convert", lora, "--to", "comfyui")
    assert code == 2 and "exists; pass --overwrite" in err
    code, out, _ = run_main(capsys, "lora", "convert", converted, "--to", "kohya", "-o", tmp_path / "back.safetensors")
    assert code == 0
    merged = tmp_path / "merged.safetensors"
    code, out, err = run_main(capsys, "lora", "merge", lora, converted, "--weights", "0.5", "0.5", "-o", merged)
    assert code == 0 and out.strip() == str(merged), err
    code, out, _ = run_main(capsys, "lora", "inspect", merged)
    assert "format      kohya" in out and "rank        4" in out  # ranks concatenated; format of the first file
    summed = ds_pipelines.parse_lora(ds_pipelines.read_lora(merged))[0]
    original = ds_pipelines.parse_lora(ds_pipelines.read_lora(lora))[0]
    back = ds_pipelines.parse_lora(ds_pipelines.read_lora(tmp_path / "back.safetensors"))[0]

    def delta(piece):
        alpha = piece.alpha if piece.alpha is not None else piece.down.shape[0]
        return piece.up.float() @ piece.down.float() * (alpha / piece.down.shape[0])

    for name, piece in original.items():  # kohya -> comfyui -> kohya, and 0.5 A + 0.5 A, keep the delta
        torch.testing.assert_close(delta(back[name]), delta(piece))
        torch.testing.assert_close(delta(summed[name]), delta(piece))


def test_lora_convert_to_diffusers(capsys, tmp_path):
    lora = kohya_lora(tmp_path / "style.safetensors")
    code, out, err = run_main(capsys, "lora", "convert", lora, "--to", "diffusers")
    assert code == 0, err
    code, out, _ = run_main(capsys, "lora", "inspect", tmp_path / "style-diffusers.safetensors")
    assert "format      diffusers" in out and "transformer_blocks.*.attn.to_q" in out


def test_free_paths_never_overwrite(tmp_path):
    out = tmp_path / "seven.png"
    assert free_paths(out, 2, False) == [out, tmp_path / "seven-1.png"]
    out.write_bytes(b"")
    (tmp_path / "seven-2.png").write_bytes(b"")
    assert free_paths(out, 2, False) == [tmp_path / "seven-1.png", tmp_path / "seven-3.png"]
    assert free_paths(out, 2, True) == [out, tmp_path / "seven-1.png"]


def test_generate_video_from_a_wan_folder(wan_files, capsys, tmp_path):
    from ds_pipelines import load_video

    output = tmp_path / "waves.mp4"
    video = ["generate", "--model", wan_files.t2v, "--prompt", "waves", "-o", output, "--frames", "5", "--fps", "8"]
    small = ["--height", "32", "--width", "32", *TINY[4:]]
    code, out, err = run_main(capsys, *video, *small, "--seed", "3")
    assert code == 0 and out.strip() == str(output), err
    frames = load_video(output)
    assert len(frames) == 5 and frames.fps == 8 and frames[0].size == (32, 32)
    assert frames.parameters["prompt"] == "waves" and frames.parameters["seed"] == 3
    code, _, err = run_main(capsys, *video[:5], "-o", tmp_path / "waves.png")
    assert code == 2 and "videos are written as mp4; use a .mp4 name" in err
    code, _, err = run_main(capsys, *video, "--guidance", "3.5")
    assert code == 2 and "--guidance is not an option of WanVideoPipeline" in err
