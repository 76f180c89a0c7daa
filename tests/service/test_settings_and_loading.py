"""Settings sources and model loading (weights files, refusal offline, tiers)."""

from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import timm
import torch
from pydantic import ValidationError

from models import tome
from service.engine.loading import ModelLoadError, load_model, resolve_device
from service.engine.tiers import build_tiers, default_tier_specs
from service.settings import ModelSpec, TierSpec, load_settings

from .conftest import TINY_MODEL

TOML = """
device = "cpu"
[[models]]
name = "a"
timm_name = "vit_tiny_patch16_224"
weights = "random"
model_kwargs = { img_size = 32, depth = 2 }
tiers = { exact = { r = 0 }, turbo = { r = 2, inflection = -1 } }
default_tier = "turbo"
[batching]
max_batch_size = 4
"""

YAML = """
device: cpu
models:
  - name: a
    timm_name: vit_tiny_patch16_224
    weights: random
limits:
  max_files: 2
"""


def test_toml_file_with_env_override(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    monkeypatch.setenv("TOME_BATCHING__MAX_WAIT_MS", "7.5")
    s = load_settings(path)
    assert s.models[0].tiers["turbo"].schedule() == (2, -1.0)
    assert s.default_model == "a"
    assert (s.batching.max_batch_size, s.batching.max_wait_ms) == (4, 7.5)
    monkeypatch.setenv("TOME_BATCHING__MAX_BATCH_SIZE", "16")
    assert load_settings(path).batching.max_batch_size == 16  # env beats the file


def test_yaml_file_via_env_var(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    monkeypatch.setenv("TOME_CONFIG_FILE", str(path))
    s = load_settings()
    assert s.limits.max_files == 2 and s.models[0].weights == "random"


def test_example_config_loads() -> None:
    from pathlib import Path

    s = load_settings(Path(__file__).resolve().parents[2] / "service" / "configs" / "cpu-demo.toml")
    assert s.device == "cpu" and s.models[0].weights == "random"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"models": []},
        {"models": [TINY_MODEL, TINY_MODEL]},
        {"models": [TINY_MODEL], "default_model": "other"},
        {"models": [TINY_MODEL], "batching": {"max_batch_size": 0}},
        {"models": [TINY_MODEL], "unknown_key": 1},
    ],
)
def test_invalid_settings_refused(kwargs) -> None:
    with pytest.raises(ValidationError):
        load_settings(**kwargs)


def test_missing_config_file() -> None:
    with pytest.raises(FileNotFoundError):
        load_settings("/nonexistent/tome.toml")


def test_tier_spec_validation() -> None:
    with pytest.raises(ValidationError):
        TierSpec(r=-1)
    with pytest.raises(ValidationError):
        TierSpec(r=[1, 2], inflection=-1)


def test_default_tiers_vit_16_at_224() -> None:
    """Uncalibrated: constant r = 0, 0.5, 0.8 and 1.0 x N/L (the former decreasing fastest tier lost 29.5
    top-1 points on the real ViT-Ti; tests/calibration/test_defaults.py measures these on it). Calibrated:
    agreement-loss budgets."""
    model = tome.patch(timm.create_model("vit_small_patch16_224", pretrained=False))
    specs = default_tier_specs(model, calibrated=False)
    assert {k: v.schedule() for k, v in specs.items()} == {
        "exact": 0,
        "balanced": 8,
        "fast": 13,
        "fastest": 16,
    }
    budgets = default_tier_specs(model, calibrated=True)
    assert [budgets[t].max_agreement_loss for t in ("exact", "balanced", "fast", "fastest")] == [
        0,
        0.05,
        0.1,
        0.15,
    ]


def test_build_tiers_refuses_too_long_schedule() -> None:
    model = tome.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2))
    with pytest.raises(ValueError):
        build_tiers(model, {"x": TierSpec(r=[1, 1, 1])})


def _spec(**kw) -> ModelSpec:
    return ModelSpec(**{**TINY_MODEL, **kw})


def test_safetensors_and_pth_weights_load_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    safetensors.torch.save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = load_model(_spec(weights=str(tmp_path / name)), torch.device("cpu"))
        assert loaded.weights_source == f"file:{tmp_path / name}"
        for key, value in source.state_dict().items():
            torch.testing.assert_close(loaded.model.vit.state_dict()[key], value, rtol=0, atol=0)


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file
def test_pth_with_arbitrary_pickle_refused(tmp_path, capsys) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(_spec(weights=str(path)), torch.device("cpu"))
    assert "pickle code ran" not in capsys.readouterr().out  # weights_only=True never called print


def test_missing_and_mismatched_weights(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(_spec(weights=str(tmp_path / "none.safetensors")), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(_spec(weights="weights.zip"), torch.device("cpu"))
    other = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3)
    safetensors.torch.save_file(other.state_dict(), tmp_path / "deeper.safetensors")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(_spec(weights=str(tmp_path / "deeper.safetensors")), torch.device("cpu"))


def test_offline_hub_failure_says_what_to_set(monkeypatch) -> None:
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelLoadError) as e:
        load_model(_spec(weights="hub"), torch.device("cpu"))
    message = str(e.value)
    assert "Hugging Face hub" in message and ".safetensors" in message and '"random"' in message


def test_unsupported_model_refused() -> None:
    spec = ModelSpec(
        name="swin",
        timm_name="vit_tiny_patch16_224",
        weights="random",
        model_kwargs={"img_size": 32, "depth": 2, "global_pool": "map"},
    )
    with pytest.raises(ModelLoadError, match="cannot apply ToMe"):
        load_model(spec, torch.device("cpu"))


def test_bad_default_tier_refused() -> None:
    with pytest.raises(ModelLoadError, match="default_tier"):
        load_model(_spec(default_tier="nope"), torch.device("cpu"))


def test_cli_reports_load_error_in_one_line(capsys) -> None:
    from service.cli import main

    assert main(["--config", "/nonexistent.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tome-serve: cannot start:") and "nonexistent" in err


@pytest.mark.parametrize(
    ("section", "typo"),
    [
        ("[[models]]", 'weigths = "x.safetensors"'),  # would fall back to the hub
        ("[batching]", "max_batchsize = 8"),
        ("[limits]", "max_file = 2"),
        ("[server]", "worker = 2"),
    ],
)
def test_unknown_keys_in_any_section_are_refused(tmp_path, section: str, typo: str) -> None:
    base = 'device = "cpu"\n[[models]]\nname = "a"\nweights = "random"\n'
    text = base.replace("[[models]]\n", f"[[models]]\n{typo}\n") if section == "[[models]]" else base
    if section != "[[models]]":
        text += f"{section}\n{typo}\n"
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        load_settings(path)


def test_tier_typo_is_refused_not_silently_constant() -> None:
    with pytest.raises(ValidationError, match="inflexion"):
        ModelSpec(**{**TINY_MODEL, "tiers": {"fast": {"r": 13, "inflexion": -1}}})


@pytest.mark.parametrize("name", ["r13", "r0", "auto"])
def test_reserved_tier_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        ModelSpec(**{**TINY_MODEL, "tiers": {name: {"r": 1}}})


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", ""])
def test_malformed_device_is_refused(device: str) -> None:
    with pytest.raises(ValidationError, match="device must be"):
        load_settings(None, device=device, models=[TINY_MODEL])


def test_cuda_device_that_is_not_there_is_a_load_error() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ModelLoadError, match="cuda:7" if count else "CUDA is not available"):
        resolve_device(f"cuda:{max(count, 7)}" if count else "cuda:7")


@pytest.mark.parametrize(
    "over",
    [{"server": {"max_pending_images": 4}}, {"batching": {"max_queue_size": 4}}],
    ids=["slots", "queue"],
)
def test_max_files_must_be_admissible(over: dict) -> None:
    with pytest.raises(ValidationError, match="could never run"):
        load_settings(None, models=[TINY_MODEL], limits={"max_files": 8}, **over)
