"""Checkpoint validation and per-stage loading.

Every way a checkpoint can be wrong is one `CheckpointError` naming the field, file or
tensor; a stage reads only the tensors it owns.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shards.checkpoint
from shards.checkpoint import load_stage, parse_config, read_model_args, tensor_files
from shards.create import RandomModelSpec, hf_config
from shards.errors import CheckpointError, UnsupportedModelError
from shards.partition import plan_stages


def config(arch: str = "llama", **spec_overrides: object) -> dict:
    return hf_config(RandomModelSpec(arch=arch, **spec_overrides))


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    """A private copy of a session checkpoint that a test may damage."""
    return Path(shutil.copytree(source, tmp_path / "checkpoint"))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "glm"])
def test_generated_configs_are_accepted(arch: str) -> None:
    args = parse_config(config(arch))
    assert args.arch == arch


def test_unsupported_model_type_names_the_field() -> None:
    cfg = config()
    cfg["model_type"] = "gpt2"
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert err.value.field == "model_type"
    assert "model_type" in str(err.value) and "gpt2" in str(err.value)


def test_missing_model_type_is_unsupported() -> None:
    cfg = config()
    del cfg["model_type"]
    with pytest.raises(UnsupportedModelError, match="model_type"):
        parse_config(cfg)


def test_wrong_architectures_entry_names_the_field() -> None:
    cfg = config("llama")
    cfg["architectures"] = ["MistralForCausalLM"]
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert err.value.field == "architectures"
    assert "MistralForCausalLM" in str(err.value)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_hidden_act_other_than_silu_names_the_field(act: str) -> None:
    cfg = config()
    cfg["hidden_act"] = act
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert err.value.field == "hidden_act"
    assert "hidden_act" in str(err.value) and act in str(err.value)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_names_the_field(rope_type: str) -> None:
    cfg = config()
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": rope_type, "factor": 2.0}
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert "rope_parameters" in err.value.field and "rope_type" in err.value.field
    assert "rope_type" in str(err.value) and rope_type in str(err.value)


def test_unsupported_rope_type_in_legacy_rope_scaling_names_that_field() -> None:
    cfg = config()
    del cfg["rope_parameters"]
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}  # transformers v4 layout
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert "rope_scaling" in str(err.value) and "dynamic" in str(err.value)


def test_scaled_rope_without_factor_is_a_checkpoint_error() -> None:
    cfg = config()
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": "linear"}
    with pytest.raises(CheckpointError, match="factor"):
        parse_config(cfg)


def test_quantization_config_is_rejected() -> None:
    cfg = config()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    assert err.value.field == "quantization_config"
    assert "quantization_config" in str(err.value)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_or_bad_size_field_names_it(key: str) -> None:
    cfg = config()
    del cfg[key]
    with pytest.raises(CheckpointError, match=key):
        parse_config(cfg)
    cfg[key] = -3
    with pytest.raises(CheckpointError, match=key):
        parse_config(cfg)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_key_value_heads", "2"),
        ("head_dim", "16"),
        ("rms_norm_eps", "tiny"),
        ("rope_parameters", ["default", 10000.0]),
    ],
)
def test_malformed_config_value_is_a_checkpoint_error_naming_the_field(
    field: str, value: object
) -> None:
    # The module's contract: everything a checkpoint can get wrong is a CheckpointError
    # naming the field, not a TypeError / ValueError from deep inside the parser.
    cfg = config()
    cfg[field] = value
    with pytest.raises(CheckpointError, match=field):
        parse_config(cfg)


def test_config_json_that_is_not_an_object_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json"):
        read_model_args(tmp_path)


def test_unsupported_model_error_survives_pickling() -> None:
    import pickle

    cfg = config()
    cfg["hidden_act"] = "gelu"
    with pytest.raises(UnsupportedModelError) as err:
        parse_config(cfg)
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.field, copy.value, str(copy)) == (err.value.field, err.value.value, str(err.value))


def test_missing_config_json_is_a_checkpoint_error(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama"), tmp_path)
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        read_model_args(model_dir)


def test_invalid_config_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        read_model_args(tmp_path)


def test_missing_safetensors_is_a_checkpoint_error(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama"), tmp_path)
    (model_dir / "model.safetensors").unlink()
    args = read_model_args(model_dir)
    with pytest.raises(CheckpointError, match="safetensors"):
        tensor_files(model_dir)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_stage(model_dir, args, 0, args.num_layers, True, True)


def test_missing_shard_file_is_named(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama", max_shard_bytes=64 * 1024), tmp_path)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (model_dir / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(missing)):
        tensor_files(model_dir)


def test_sharded_index_maps_every_tensor_to_its_file(make_checkpoint) -> None:
    model_dir = make_checkpoint("llama", max_shard_bytes=64 * 1024)
    files = tensor_files(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert {name: path.name for name, path in files.items()} == index["weight_map"]
    for name, path in files.items():
        with safe_open(path, "pt") as f:
            assert name in f.keys()


def test_missing_tensor_is_named(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama", layers=4), tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    gone = "model.layers.2.mlp.down_proj.weight"
    del tensors[gone]
    save_file(tensors, path, metadata={"format": "pt"})
    args = read_model_args(model_dir)

    with pytest.raises(CheckpointError, match=re.escape(gone)):
        load_stage(model_dir, args, 2, 4, first=False, last=True)
    # A stage that does not own layer 2 never looks for it.
    stage = load_stage(model_dir, args, 0, 2, first=True, last=False)
    assert set(stage.layers) == {"0", "1"}


def test_missing_untied_lm_head_is_named(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama", layers=4), tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    args = read_model_args(model_dir)
    with pytest.raises(CheckpointError, match=re.escape("lm_head.weight")):
        load_stage(model_dir, args, 2, 4, first=False, last=True)


def test_misshaped_tensor_names_it_and_both_shapes(make_checkpoint, tmp_path: Path) -> None:
    model_dir = copy_checkpoint(make_checkpoint("llama", layers=4), tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    expected_shape = (cfg["num_key_value_heads"] * cfg["head_dim"], cfg["hidden_size"])
    bad_shape = (expected_shape[0] + 3, expected_shape[1] - 5)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    assert tuple(tensors[name].shape) == expected_shape
    tensors[name] = torch.zeros(bad_shape)
    save_file(tensors, path, metadata={"format": "pt"})
    args = read_model_args(model_dir)

    with pytest.raises(CheckpointError) as err:
        load_stage(model_dir, args, 0, 2, first=True, last=False)
    message = str(err.value)
    assert name in message
    for shape in (expected_shape, bad_shape):
        assert re.search(rf"\b{shape[0]}\D+{shape[1]}\b", message), (shape, message)


class RecordingHandle:
    """Wraps a safetensors handle, recording every tensor name whose data or shape is read."""

    def __init__(self, handle, reads: list[str], slices: list[str]) -> None:
        self._handle, self._reads, self._slices = handle, reads, slices

    def __enter__(self) -> RecordingHandle:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def metadata(self):
        return self._handle.metadata()

    def get_slice(self, name: str):
        self._slices.append(name)
        return self._handle.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        self._reads.append(name)
        return self._handle.get_tensor(name)


@pytest.fixture
def recorded_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    reads: list[str] = []
    slices: list[str] = []

    def recording_safe_open(*args, **kwargs) -> RecordingHandle:
        return RecordingHandle(safe_open(*args, **kwargs), reads, slices)

    monkeypatch.setattr(shards.checkpoint, "safe_open", recording_safe_open)
    return reads, slices


def own_tensor_names(
    all_names: set[str], layer_start: int, layer_end: int, first: bool, last: bool, tied: bool
) -> set[str]:
    """The HF tensors a stage needs, chosen from the file's own key list."""
    owned = set()
    for name in all_names:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and layer_start <= int(layer.group(1)) < layer_end:
            owned.add(name)
    if first or (last and tied):
        owned.add("model.embed_tokens.weight")
    if last:
        owned.add("model.norm.weight")
        if not tied:
            owned.add("lm_head.weight")
    return owned


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("stage_index", [0, 1])
def test_stage_reads_only_its_own_tensors(
    make_checkpoint, recorded_reads, tied: bool, sharded: bool, stage_index: int
) -> None:
    model_dir = make_checkpoint(
        "glm", layers=4, tie_word_embeddings=tied, max_shard_bytes=64 * 1024 if sharded else None
    )
    all_names = set(load_all(model_dir))
    args = read_model_args(model_dir)
    plan = plan_stages(args, 2, n_slots=1, max_seq_len=8, dtype=torch.float32)[stage_index]
    reads, slices = recorded_reads

    stage = load_stage(model_dir, args, plan.layer_start, plan.layer_end, plan.first, plan.last)

    expected = own_tensor_names(
        all_names, plan.layer_start, plan.layer_end, plan.first, plan.last, tied
    )
    assert sorted(reads) == sorted(expected)  # each read exactly once
    assert set(slices) <= expected
    if stage_index == 1 and not tied:
        assert not any("embed_tokens" in name for name in reads)
    if stage_index == 0:
        assert not any(name in reads for name in ("model.norm.weight", "lm_head.weight"))
    assert set(stage.layers) == {str(i) for i in range(plan.layer_start, plan.layer_end)}


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loaded_stage_holds_the_file_tensors(make_checkpoint, tied: bool) -> None:
    model_dir = make_checkpoint("qwen2", layers=4, tie_word_embeddings=tied)
    stored = load_all(model_dir)
    args = read_model_args(model_dir)
    stage = load_stage(model_dir, args, 2, 4, first=False, last=True, dtype=torch.bfloat16)
    params = dict(stage.named_parameters())
    for name, value in params.items():
        assert value.dtype == torch.bfloat16
        source = name if name.startswith("lm_head.") else f"model.{name}"
        if tied and name == "lm_head.weight":
            source = "model.embed_tokens.weight"
        torch.testing.assert_close(value, stored[source].to(torch.bfloat16), atol=0, rtol=0)
    expected = own_tensor_names(set(stored), 2, 4, first=False, last=True, tied=tied)
    assert len(params) == len(expected)  # tied: lm_head stands in for the embedding it copies
    assert not any(p.requires_grad for p in params.values())
