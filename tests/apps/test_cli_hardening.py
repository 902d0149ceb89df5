"""``diffsynth`` under hostile but fair input: non-finite numbers, sizes no model can make, errors whose detail is
on later lines, files whose text would drive the terminal, and values that used to give misleading messages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import ds_cli.options
from ds_cli.common import printable
from ds_cli.main import build_parser, error_text
from tests.apps.test_cli import TINY, kohya_lora, metadata, run_main

ESCAPES = ("\x1b", "\x07", "\x9b", "\x00", "\x7f")  # ESC, BEL, CSI, NUL, DEL: none may reach the terminal raw
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def _parsers(parser: argparse.ArgumentParser, path: str = "diffsynth"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _options() -> dict[str, dict[str, object]]:
    """Each command's options and their argparse types."""
    return {
        path: {action.option_strings[-1]: action.type for action in parser._actions if action.option_strings}
        for path, parser in _parsers(build_parser()[0])
    }


# --------------------------------------------------------------------------- 1. non-finite numbers are usage errors
def test_no_option_takes_a_bare_float_or_int():
    """float("nan") and float("inf") parse, int("-5") parses: every number goes through a checked type. ``models
    list`` is left out: its size options move to the family registry with its listing."""
    for path, options in _options().items():
        for option, kind in options.items():
            assert kind is not float, f"{path} {option} takes any float, nan and inf included"
            if path != "diffsynth models list":
                assert kind is not int, f"{path} {option} takes any int, negatives included"


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "--prompt", "x", "--cfg-scale", "nan"),
        ("generate", "--prompt", "x", "--cfg-scale", "inf"),
        ("generate", "--prompt", "x", "--guidance=-inf"),  # "-inf" alone reads as an option
        ("generate", "--prompt", "x", "--sigma-shift", "NaN"),
        ("generate", "--prompt", "x", "--fps", "infinity"),
        ("generate", "--prompt", "x", "--strength", "nan"),
        ("generate", "--prompt", "x", "--vram-limit", "1e999"),
        ("vram", "--model", "flux.1-dev", "--gpu-memory", "nan"),
        ("train", "lora", "--model", "m", "--data", ".", "--output", "o", "--learning-rate", "nan"),
        ("train", "lora", "--model", "m", "--data", ".", "--output", "o", "--alpha", "inf"),
        ("train", "lora", "--model", "m", "--data", ".", "--output", "o", "--caption-dropout", "nan"),
        ("train", "lora", "--model", "m", "--data", ".", "--output", "o", "--vram-limit", "nan"),
        ("train", "full", "--model", "m", "--data", ".", "--output", "o", "--sigma-shift=-inf"),
    ],
)
def test_non_finite_options_are_usage_errors_naming_the_option(capsys, args):
    given = (a.split("=")[0] for a in args if a.startswith("--"))
    option = next(a for a in given if a not in ("--prompt", "--model", "--data", "--output"))
    code, _, err = run_main(capsys, *args)
    assert code == 2 and f"argument {option}: " in err and "is not a finite number" in err, err


def test_a_non_finite_lora_scale_or_merge_weight_is_a_usage_error(capsys, tmp_path):
    lora = kohya_lora(tmp_path / "ink.safetensors")
    for scale in ("nan", "inf", "-inf", "1e999"):
        code, _, err = run_main(capsys, "generate", "--prompt", "x", "--lora", f"{lora}:{scale}")
        assert code == 2 and "argument --lora: " in err and f"the scale {scale} is not a finite number" in err
    output = tmp_path / "merged.safetensors"
    code, _, err = run_main(capsys, "lora", "merge", lora, lora, "--weights", "nan", "1", "-o", output)
    assert code == 2 and "argument --weights: nan is not a finite number" in err and not output.exists()


# ------------------------------------------------------------------ 2. one validation, shared by every command
def test_commands_share_one_type_per_option():
    seen: dict[str, tuple[str, object]] = {}
    for path, options in _options().items():
        for option in ("--height", "--width", "--frames", "--num-frames", "--steps", "--vram-limit", "--sigma-shift"):
            if option in options and path != "diffsynth models list":
                name = "--frames" if option == "--num-frames" else option
                first = seen.setdefault(name, (path, options[option]))
                assert options[option] is first[1], f"{path} {option} is checked unlike {first[0]}'s"


def test_vram_refuses_what_generate_refuses(capsys):
    code, out, err = run_main(capsys, "vram", "--model", "flux.1-dev", "--gpu-memory", "8", "--height", "0")
    assert code == 2 and out == "" and "argument --height: must be an integer of at least 1, not 0" in err
    code, _, generate_err = run_main(capsys, "generate", "--prompt", "x", "--height", "0")
    assert code == 2 and "argument --height: must be an integer of at least 1, not 0" in generate_err
    code, out, err = run_main(capsys, "vram", "--model", "flux.1-dev", "--gpu-memory", "8", "--width", "1000")
    assert code == 2 and out == ""
    assert "--width 1000: flux.1-dev needs a multiple of 16 pixels; the nearest valid sizes are 992 and 1008" in err
    code, out, err = run_main(capsys, "vram", "--model", "wan2.1-t2v-1.3b", "--gpu-memory", "8", "--frames", "80")
    assert code == 2 and "--frames 80: wan2.1-t2v-1.3b needs 4k+1 frames" in err and "77 and 81" in err
    code, out, err = run_main(capsys, "vram", "--model", "wan2.2-ti2v-5b", "--gpu-memory", "8", "--height", "720")
    assert code == 2 and "needs a multiple of 32 pixels; the nearest valid sizes are 704 and 736" in err
    code, out, _ = run_main(capsys, "vram", "--model", "wan2.2-ti2v-5b", "--gpu-memory", "80", "--height", "704")
    assert code == 0 and "setting" in out


def test_generate_and_train_check_a_presets_size_before_loading(capsys, monkeypatch, tmp_path):
    import ds_pipelines

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model for a size that was refused")

    monkeypatch.setattr(ds_pipelines.FluxImagePipeline, "from_pretrained", refuse)
    code, _, err = run_main(capsys, "generate", "--model", "flux.1-dev", "--prompt", "x", "--width", "1000")
    assert code == 2 and "--width 1000: flux.1-dev needs a multiple of 16 pixels" in err
    train = ("train", "lora", "--model", "flux.1-dev", "--data", tmp_path, "--output", tmp_path / "run")
    code, _, err = run_main(capsys, *train, "--height", "1000")
    assert code == 2 and "--height 1000: flux.1-dev needs a multiple of 16 pixels" in err
    code, _, err = run_main(capsys, *train, "--steps", "0")
    assert code == 2 and "argument --steps: must be an integer of at least 1, not 0" in err


# ------------------------------------------------------------------------------- 3. whole multi-line errors
def test_train_prints_every_broken_row_up_to_ten_and_counts_the_rest(flux_files, tmp_path, capsys):
    rows = "".join(f"missing{i}.png,a caption\n" for i in range(12))
    (tmp_path / "metadata.csv").write_text("image,caption\n" + rows, encoding="utf-8")
    args = ("--model", flux_files.repo, "--data", tmp_path, "--output", tmp_path / "run", "--device", "cpu")
    code, _, err = run_main(capsys, "train", "lora", *args, "--mixed-precision", "no", "--no-progress")
    assert code == 1, err
    message = err[err.index("diffsynth: error:") :].splitlines()
    assert "12 broken row(s)" in message[0] and message[0].endswith("to drop them:")
    assert [line.split(":")[0].strip() for line in message[1:11]] == [f"metadata.csv row {i}" for i in range(1, 11)]
    assert "missing0.png: file not found" in message[1] and message[11:] == ["  ... and 2 more"]


def test_error_text_keeps_every_line_and_adds_its_own_count_to_the_messages():
    rows = "\n  ".join(f"row {i}: broken" for i in range(50))
    text = error_text(ValueError(f"data: 60 broken row(s):\n  {rows}\n  ... and 10 more"))
    lines = text.splitlines()
    assert lines[0] == "data: 60 broken row(s):" and lines[1:11] == [f"  row {i}: broken" for i in range(10)]
    assert lines[11:] == ["  ... and 50 more"]
    assert error_text(ValueError("first\nsecond")) == "first\nsecond"
    assert error_text(KeyError("missing key")) == "missing key" and error_text(ValueError()) == "ValueError"


# ---------------------------------------------------------------------------------------- 4. terminal escapes
def test_printable_escapes_c0_del_c1_and_undecodable_bytes():
    assert printable("a\x1b[2Jb\x07\x7f\x9b\x00\udcff\tc\nd") == "a\\x1b[2Jb\\x07\\x7f\\x9b\\x00\\udcff\\tc\\nd"
    assert printable("line\nnext\x1b", keep="\n") == "line\nnext\\x1b"
    assert printable("café ünï 日本") == "café ünï 日本"


def test_lora_inspect_escapes_metadata_and_key_names(capsys, tmp_path):
    lora = tmp_path / "evil.safetensors"
    state = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 64),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 2),
        f"junk{HOSTILE}": torch.zeros(1),
    }
    save_file(state, lora, metadata={"ss_title": HOSTILE, f"key{HOSTILE}": "two\nlines", "ok": "plain"})
    code, out, err = run_main(capsys, "lora", "inspect", lora)
    assert code == 0, err
    assert not any(char in out for char in ESCAPES)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m" in out and "two\\nlines" in out and "ok " in out
    assert all(line.startswith((str(lora), "  ")) for line in out.splitlines())  # no forged lines


def test_models_inspect_and_errors_escape_text_from_the_file(capsys, tmp_path):
    path = tmp_path / "evil.safetensors"
    save_file({f"weight{HOSTILE}": torch.zeros(2), f"bias\n{HOSTILE}": torch.zeros(2)}, path)
    code, out, err = run_main(capsys, "models", "inspect", path)
    assert code == 0, err
    assert not any(char in out + err for char in ESCAPES)
    only_keys = tmp_path / "keys.safetensors"
    save_file({f"x{HOSTILE}": torch.zeros(1)}, only_keys)
    code, _, err = run_main(capsys, "lora", "inspect", only_keys)  # the error quotes the file's first keys
    assert code == 1 and "\\x1b]0;pwned" in err and not any(char in err for char in ESCAPES)


# --------------------------------------------------------------------------------- 5. messages that mislead
def test_a_lora_scale_that_is_not_a_number_says_so(capsys, tmp_path):
    lora = kohya_lora(tmp_path / "x.safetensors")
    code, _, err = run_main(capsys, "generate", "--prompt", "p", "--lora", f"{lora}:abc")
    assert code == 2 and "the scale 'abc' after the last ':' is not a number" in err and "no such file" not in err
    parser = build_parser()[0]
    exact = tmp_path / "x.safetensors:abc"  # a file named exactly so is the LoRA, at scale 1
    exact.write_bytes(lora.read_bytes())
    assert parser.parse_args(["generate", "--prompt", "p", "--lora", str(exact)]).lora == [(str(exact), 1.0)]
    assert parser.parse_args(["generate", "--prompt", "p", "--lora", f"{lora}:-0.5"]).lora == [(str(lora), -0.5)]
    windows = parser.parse_args(["generate", "--prompt", "p", "--lora", "C:\\loras\\ink.safetensors"]).lora
    assert windows == [("C:\\loras\\ink.safetensors", 1.0)]


def test_a_prompt_that_is_not_utf8_says_so_and_where(capsys):
    code, _, err = run_main(capsys, "generate", "--prompt", "a cat \udcff\udcfe in", "--steps", "1")
    assert code == 2 and "argument --prompt: not valid UTF-8: byte 0xff at character 7 (after 'a cat ')" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--negative-prompt", "\udc80")
    assert code == 2 and "argument --negative-prompt: not valid UTF-8: byte 0x80" in err
    train = ("train", "lora", "--model", "m", "--data", ".", "--output", "o")
    code, _, err = run_main(capsys, *train, "--sample-prompt", "ok", "--sample-prompt", "bad \udce9")
    assert code == 2 and "argument --sample-prompt: not valid UTF-8: byte 0xe9" in err


def test_a_non_utf8_prompt_from_the_real_command_line():
    environment = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(
        [sys.executable, "-m", "ds_cli", "generate", "--prompt", b"caf\xe9 au lait"],
        capture_output=True,
        timeout=300,
        env=environment,
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "argument --prompt: not valid UTF-8: byte 0xe9 at character 4" in err, err
    assert "TextEncodeInput" not in err and "Traceback" not in err


def test_seeds_in_the_range_torch_takes(flux_files, capsys, tmp_path):
    top = 2**64 - 1
    torch.Generator().manual_seed(top)  # the largest seed we accept is one torch takes
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(top + 1)
    for seed in (str(2**70), "-1", "2**70", "1.5"):
        code, _, err = run_main(capsys, "generate", "--prompt", "x", "--seed", seed)
        assert code == 2 and "argument --seed: " in err and "Overflow" not in err, err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--seed", str(2**70))
    assert f"a seed must be in [0, {top}]" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--seed", str(top), "--count", "2")
    assert code == 2 and f"the last seed would be {top + 1}" in err
    code, _, err = run_main(capsys, "train", "lora", "--model", "m", "--data", ".", "--output", "o", "--seed", "2**40")
    assert code == 2 and "argument --seed: " in err
    output = tmp_path / "top.png"
    model = ("--model", flux_files.bfl_repo, "--prompt", "x", "-o", output, *TINY)
    code, _, err = run_main(capsys, "generate", *model, "--seed", str(top))
    assert code == 0 and metadata(output)["seed"] == top, err


# -------------------------------------------------------------------------- 6. sizes checked before loading
def test_a_size_too_large_for_the_memory_is_refused_before_loading(capsys, monkeypatch):
    import ds_pipelines

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model for a size that was refused")

    monkeypatch.setattr(ds_pipelines.FluxImagePipeline, "from_pretrained", refuse)
    huge = ("--height", "100000", "--width", "100000")
    code, _, err = run_main(capsys, "generate", "--model", "flux.1-dev", "--prompt", "x", *huge)
    assert code == 2 and "--height 100000 --width 100000: flux.1-dev needs about" in err
    assert ("GiB free" in err or "GiB of RAM available" in err) and "its default size is 1024x1024" in err
    monkeypatch.setattr(ds_cli.options, "available_memory", lambda device: (2**29, "the host has 0.5 GiB available"))
    code, _, err = run_main(capsys, "generate", "--prompt", "x", "--height", "2048", "--width", "2048", *TINY[4:])
    assert code == 2 and "demo-digits needs about" in err and "the host has 0.5 GiB available" in err


def test_a_local_model_or_a_tiled_decode_has_a_conservative_size_limit(flux_files, capsys, monkeypatch):
    import ds_pipelines

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model for a size that was refused")

    monkeypatch.setattr(ds_pipelines.FluxImagePipeline, "from_pretrained", refuse)
    code, _, err = run_main(capsys, "generate", "--model", flux_files.bfl_repo, "--prompt", "x", "--height", "100000")
    assert code == 2 and "--height 100000: too large; for a model given as a folder or file the limit" in err
    assert "8192 pixels a side" in err and "GiB" in err
    tiled = ("--prompt", "x", "--tiled", "--height", "16384", "--width", "16384")
    code, _, err = run_main(capsys, "generate", "--model", "flux.1-dev", *tiled)
    assert code == 2 and "for a tiled decode the limit is 8192 pixels a side" in err
