"""ModelConfig resolution and downloads, with the hub clients replaced: no test touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_loader import HuggingFaceHub, ModelConfig, ModelScopeHub, UnsafePathError, load_model

ENV = ("DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD", "MODELSCOPE_DOMAIN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


class FakeHub:
    """Records calls and 'downloads' by writing the files it was given."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = files or {}
        self.calls: list[tuple[str, Path, list[str], list[str]]] = []

    def download(self, model_id, local_dir, allow_patterns, ignore_patterns):
        self.calls.append((model_id, Path(local_dir), allow_patterns, ignore_patterns))
        for name, data in self.files.items():
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


class NoNetwork:
    def download(self, *args, **kwargs):
        raise AssertionError("a download was attempted")


def test_download_then_resolve_then_reuse(tmp_path):
    hub = FakeHub({"flux1-dev.safetensors": b"x", "ae.safetensors": b"y"})
    config = ModelConfig(model_id="org/FLUX", origin_file_pattern="flux1-dev.safetensors", local_model_path=tmp_path)
    assert config.resolve(hub=hub) == [tmp_path / "org/FLUX/flux1-dev.safetensors"]
    assert hub.calls == [("org/FLUX", tmp_path / "org/FLUX", ["flux1-dev.safetensors"], [])]
    # Present files are not fetched again: no client call at all, so this works offline.
    assert config.resolve(hub=NoNetwork()) == [tmp_path / "org/FLUX/flux1-dev.safetensors"]


def test_partly_present_files_are_ignored_in_the_download(tmp_path):
    model_dir = tmp_path / "org/m"
    (model_dir / "text_encoder").mkdir(parents=True)
    (model_dir / "text_encoder" / "model.safetensors").write_bytes(b"x")
    hub = FakeHub({"vae/diffusion_pytorch_model.safetensors": b"v"})
    config = ModelConfig(model_id="org/m", origin_file_pattern=["text_encoder/", "vae/"], local_model_path=tmp_path)
    assert config.resolve(hub=hub) == [model_dir / "text_encoder", model_dir / "vae"]
    ((_, _, allow, ignore),) = hub.calls
    assert allow == ["text_encoder/*", "vae/*"] and ignore == ["text_encoder/model.safetensors"]


def test_whole_repository_pattern(tmp_path):
    hub = FakeHub({"model_index.json": b"{}"})
    for pattern in (None, "", "./"):
        config = ModelConfig(model_id="org/all", origin_file_pattern=pattern, local_model_path=tmp_path)
        assert config.resolve(hub=hub) == [tmp_path / "org/all"]
    assert all(call[2] == ["*"] for call in hub.calls)


def test_local_path_never_downloads(files):
    config = ModelConfig(path=[files.original, str(files.vae)])
    assert config.resolve(hub=NoNetwork()) == [files.original, files.vae]
    with pytest.raises(FileNotFoundError, match=r"ModelConfig path not found: .*nope\.safetensors"):
        ModelConfig(path=files.root / "nope.safetensors").resolve(hub=NoNetwork())


def test_skip_download_by_field_and_by_env(tmp_path, monkeypatch):
    config = ModelConfig(
        model_id="org/m", origin_file_pattern="w.safetensors", local_model_path=tmp_path, skip_download=True
    )
    with pytest.raises(
        FileNotFoundError, match=r"model folder .*org/m for 'org/m' does not exist and downloads are skipped"
    ):
        config.resolve(hub=NoNetwork())
    (tmp_path / "org/m").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no file in .*org/m matches origin_file_pattern='w.safetensors'"):
        config.resolve(hub=NoNetwork())
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "TRUE")
    env_config = ModelConfig(model_id="org/m", origin_file_pattern="w.safetensors", local_model_path=tmp_path)
    with pytest.raises(FileNotFoundError):
        env_config.resolve(hub=NoNetwork())
    # The field wins over the environment.
    hub = FakeHub({"w.safetensors": b"w"})
    env_config.skip_download = False
    assert env_config.resolve(hub=hub) == [tmp_path / "org/m/w.safetensors"]
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "maybe")
    with pytest.raises(ValueError, match=r"DIFFSYNTH_SKIP_DOWNLOAD='maybe' must be one of"):
        ModelConfig(model_id="org/m", origin_file_pattern="x").resolve(hub=NoNetwork())


def test_base_path_env_and_explicit_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(model_id="a/b").model_dir == Path("./models/a/b")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "env"))
    assert ModelConfig(model_id="a/b").model_dir == tmp_path / "env/a/b"
    assert ModelConfig(model_id="a/b", local_model_path=tmp_path / "mine").model_dir == tmp_path / "mine/a/b"


def test_download_source_selection(monkeypatch):
    assert ModelConfig(model_id="a/b").source == "modelscope"
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")
    assert ModelConfig(model_id="a/b").source == "huggingface"
    assert ModelConfig(model_id="a/b", download_source="modelscope").source == "modelscope"
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "civitai")
    with pytest.raises(ValueError, match=r"DIFFSYNTH_DOWNLOAD_SOURCE='civitai' is not supported"):
        _ = ModelConfig(model_id="a/b").source
    with pytest.raises(ValueError, match=r"download_source='ftp' is not supported"):
        ModelConfig(model_id="a/b", download_source="ftp")


def test_default_clients_pass_patterns_and_endpoint(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(model_id, **kwargs):
        calls.append((model_id, kwargs))

    monkeypatch.setenv("MODELSCOPE_DOMAIN", "modelscope.ai")
    hub = ModelScopeHub.from_env()
    assert hub.endpoint == "https://modelscope.ai"
    hub._snapshot_download = fake_snapshot_download
    hub.download("a/b", tmp_path, ["*.json"], ["x.json"])
    HuggingFaceHub(snapshot_download=fake_snapshot_download).download("a/b", tmp_path, ["*.json"], [])
    assert calls == [
        (
            "a/b",
            {
                "local_dir": str(tmp_path),
                "allow_file_pattern": ["*.json"],
                "ignore_file_pattern": ["x.json"],
                "endpoint": "https://modelscope.ai",
            },
        ),
        ("a/b", {"local_dir": str(tmp_path), "allow_patterns": ["*.json"], "ignore_patterns": None}),
    ]
    monkeypatch.delenv("MODELSCOPE_DOMAIN")
    assert ModelScopeHub.from_env().endpoint is None


@pytest.mark.parametrize(
    "model_id", ["../evil", "org/../../etc", "/abs/path", "org//x", "./org", "C:\\win", "a\\..\\b", ""]
)
def test_model_ids_escaping_the_base_are_refused(model_id):
    with pytest.raises(UnsafePathError, match=r"model_id="):
        ModelConfig(model_id=model_id)


@pytest.mark.parametrize(
    "pattern", ["../other/*.safetensors", "/etc/passwd", "sub/../../x", "..\\x", ["ok.json", "/abs"]]
)
def test_file_patterns_escaping_the_model_dir_are_refused(pattern):
    with pytest.raises(UnsafePathError, match=r"origin_file_pattern=.* is refused"):
        ModelConfig(model_id="org/m", origin_file_pattern=pattern)


def test_fields_changed_after_construction_are_checked_again(tmp_path):
    config = ModelConfig(model_id="org/m", origin_file_pattern="w.safetensors", local_model_path=tmp_path)
    config.origin_file_pattern = "../../outside.safetensors"
    with pytest.raises(UnsafePathError):
        config.resolve(hub=NoNetwork())
    config.origin_file_pattern, config.model_id = "w.safetensors", "../up"
    with pytest.raises(UnsafePathError):
        config.resolve(hub=NoNetwork())


def test_config_needs_a_path_or_an_id():
    with pytest.raises(ValueError, match=r"needs path= .* or model_id="):
        ModelConfig()


def test_load_model_downloads_through_the_injected_hub(tmp_path, files, registered, tiny):
    hub = FakeHub({"dit.safetensors": files.original.read_bytes()})
    config = ModelConfig(model_id="tiny/dit", origin_file_pattern="dit.safetensors", local_model_path=tmp_path)
    model = load_model(config, hub=hub)
    assert isinstance(model, tiny.TinyDiT) and len(hub.calls) == 1
    load_model(config, hub=NoNetwork())
