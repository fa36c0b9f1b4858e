"""Bad input to tools/convert_hf_to_megatron.py fails before any model is built, with a message naming the problem;
and the streaming safetensors reader/writer keep names, shards and index consistent."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_topd.convert.mapping import TensorNamesError, check_hf_names, hf_shapes
from megatron_topd.convert.safetensors_io import CheckpointFilesError, SafetensorsReader, ShardedSafetensorsWriter
from megatron_topd.testing.tiny_families import build_family_model

REPO = Path(__file__).resolve().parents[2]


def tool_main(argv):
    path = REPO / "tools" / "convert_hf_to_megatron.py"
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_family_model(tmp_path_factory.mktemp("hf") / "qwen3_moe", "qwen3_moe", tokenizer=False)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def as_single_file(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` as one model.safetensors whose tensors are `edit(dict)`."""
    reader = SafetensorsReader(src)
    tensors = edit({name: reader.get(name) for name in reader.names()})
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def run_tool(args, capsys):
    rc = tool_main(args)
    return rc, capsys.readouterr().err


def test_missing_shard_file(moe_dir, tmp_path, capsys):
    bad = copy_of(moe_dir, tmp_path / "bad")
    (bad / "model-00003-of-00006.safetensors").unlink()
    rc, err = run_tool(["--hf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "model-00003-of-00006.safetensors" in err and "missing" in err
    assert not (tmp_path / "out").exists()


def test_no_weights_at_all(moe_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(moe_dir / "config.json", bad / "config.json")
    with pytest.raises(CheckpointFilesError, match="model.safetensors.index.json"):
        SafetensorsReader(bad)


def test_missing_and_unexpected_tensors_are_listed(moe_dir, tmp_path, capsys):
    gone = "model.layers.2.mlp.experts.3.up_proj.weight"
    extra = "model.layers.0.mlp.shared_expert.gate_proj.weight"

    def edit(tensors):
        tensors.pop(gone)
        tensors[extra] = torch.zeros(4, 4)
        return tensors

    bad = as_single_file(moe_dir, tmp_path / "bad", edit)
    rc, err = run_tool(["--hf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and gone in err and extra in err and "1 missing" in err and "1 unexpected" in err


def test_wrong_shape_is_reported(moe_dir, tmp_path, capsys):
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = as_single_file(moe_dir, tmp_path / "bad", lambda t: {**t, name: t[name][:, :-1].contiguous()})
    rc, err = run_tool(["--hf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and name in err and "shapes" in err


def test_unsupported_architecture_and_bad_tp(moe_dir, tmp_path, capsys):
    bad = copy_of(moe_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    rc, err = run_tool(["--hf", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "GPT2LMHeadModel" in err and "Qwen3MoeForCausalLM" in err
    # 4 query heads / 2 kv heads cannot be split 4 ways
    rc, err = run_tool(["--hf", str(moe_dir), "--out", str(tmp_path / "out"), "--tp", "4"], capsys)
    assert rc == 2 and "tensor_parallel=4" in err and "num_kv_heads=2" in err


def test_skipped_names_are_explicit():
    from megatron_topd.convert.families import spec_from_hf_config
    from megatron_topd.testing.tiny_families import family_config

    spec = spec_from_hf_config(json.loads(family_config("qwen3").to_json_string()))  # tied embeddings
    names = set(hf_shapes(spec)) | {"lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert check_hf_names(spec, names) == ["model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight"]
    with pytest.raises(TensorNamesError, match="model.norm.weight"):
        check_hf_names(spec, names - {"model.norm.weight"})


def test_writer_shards_and_index_roundtrip(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 16) for i in range(5)}  # 4 KiB each
    writer = ShardedSafetensorsWriter(tmp_path / "out", max_shard_bytes=9000)
    for name, t in tensors.items():
        writer.add(name, t)
    with pytest.raises(ValueError, match="twice"):
        writer.add("t0", tensors["t0"])
    files = writer.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4  # 2 + 2 + 1 tensors
    index = json.loads((tmp_path / "out" / files[-1]).read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 16 * 4
    reader = SafetensorsReader(tmp_path / "out")
    assert reader.names() == set(tensors)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
