"""CLI behaviour, in-process (each torch-importing subprocess costs seconds), plus one real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from parca.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys, hf_dirs):
    code, out, _ = run(capsys, "info", "--model", str(hf_dirs["qwen3"][0]), "--context", "1000")
    assert code == 0
    assert "Qwen3ForCausalLM" in out and "KV cache" in out and "fits" in out
    code, out, _ = run(capsys, "info", "--model", str(hf_dirs["qwen3"][0]), "--json")
    info = json.loads(out)
    # 2 (k,v) x 2 kv heads x 32 head_dim x 4 bytes
    assert info["kv_bytes_per_token_per_layer"] == 512 and info["kv_bytes_per_token"] == 1024
    import transformers

    hf = hf_dirs["qwen3"][1]
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama3_rope"])
def test_info_parameter_count(capsys, hf_dirs, arch):
    path, hf = hf_dirs[arch]
    _, out, _ = run(capsys, "info", "--model", str(path), "--json")
    assert json.loads(out)["parameters"] == sum(p.numel() for p in hf.parameters())


def test_generate_json_and_stream(capsys, hf_dirs):
    path = str(hf_dirs["qwen3"][0])
    code, out, _ = run(capsys, "generate", "--model", path, "--prompt", "the contract", "--max-new-tokens", "6", "--json")
    assert code == 0
    obj = json.loads(out)
    assert set(obj) >= {"text", "token_ids", "usage", "timings"}
    assert obj["usage"]["completion_tokens"] == len(obj["token_ids"]) <= 6
    code, out, err = run(capsys, "generate", "--model", path, "--prompt", "the contract", "--max-new-tokens", "6")
    assert code == 0 and out.rstrip("\n") == obj["text"].rstrip("\n") and "prompt" in err


def test_generate_chat_template_from_jinja_file(capsys, tmp_path, hf_dirs):
    d = tmp_path / "m"
    shutil.copytree(hf_dirs["qwen3"][0], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    from parca.tokenizer import Tokenizer

    text = Tokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>user: hi\n<s>assistant:"
    code, out, _ = run(capsys, "generate", "--model", str(d), "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["usage"]["prompt_tokens"] == len(Tokenizer(d).encode(text))


# ---- errors: one line, non-zero exit, no traceback ----------------------------------------------
def _err(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_error_missing_dir(capsys, tmp_path):
    assert "does not exist" in _err(capsys, "info", "--model", str(tmp_path / "nope"))


def test_error_missing_config(capsys, tmp_path):
    assert "config.json: not found" in _err(capsys, "info", "--model", str(tmp_path))


def test_error_unsupported_arch(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    err = _err(capsys, "info", "--model", str(tmp_path))
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_missing_weights_and_pickle_refused(capsys, tmp_path, hf_dirs):
    d = _copy(hf_dirs["llama"][0], tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    err = _err(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert "no model.safetensors" in err and "never unpickles" in err


def test_error_tensor_missing_and_shape(capsys, tmp_path, hf_dirs):
    d = _copy(hf_dirs["llama"][0], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"))
    err = _err(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert name in err and "(3, 3)" in err and "(128, 64)" in err
    del sd[name]
    save_file(sd, str(d / "model.safetensors"))
    assert name in _err(capsys, "generate", "--model", str(d), "--prompt", "x")


def test_error_corrupt_safetensors(capsys, tmp_path, hf_dirs):
    d = _copy(hf_dirs["llama"][0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "corrupt" in _err(capsys, "generate", "--model", str(d), "--prompt", "x")
    (d / "model.safetensors").write_bytes(b"\xff" * 100)
    assert "corrupt" in _err(capsys, "generate", "--model", str(d), "--prompt", "x")


def test_error_prompt_too_long(capsys, hf_dirs):
    err = _err(capsys, "generate", "--model", str(hf_dirs["llama"][0]), "--prompt", "the " * 700)
    assert "context is 512" in err


def test_error_will_not_fit(capsys, tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128000, "hidden_size": 16384,
           "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
           "num_key_value_heads": 8, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(capsys, "info", "--model", str(tmp_path), "--context", "131072")
    assert code == 0 and "does NOT fit" in out
    err = _err(capsys, "generate", "--model", str(tmp_path), "--prompt", "x")
    assert "needs" in err and "available" in err


def test_error_prompt_file_missing(capsys, hf_dirs, tmp_path):
    assert "not found" in _err(capsys, "generate", "--model", str(hf_dirs["llama"][0]), "--prompt-file", str(tmp_path / "p.txt"))


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "parca", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "generate" in r.stdout


def test_info_deepseek_v32_bytes(capsys, tmp_path):
    """From config.json alone: 1152 B bf16 latent, 656 B fp8 layout, 132 B fp8 indexer keys per token per layer."""
    from pathlib import Path

    from parca import cost
    from parca.config import load_config

    shutil.copy(Path(__file__).parent / "data" / "deepseek_v32_config.json", tmp_path / "config.json")
    code, out, _ = run(capsys, "info", "--model", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["kv_bytes_per_token_per_layer"] == 1152
    assert info["fp8_layout"] == {"kv_bytes_per_token_per_layer": 656, "index_bytes_per_token_per_layer": 132}
    cfg, sc, _ = cost.preset("deepseek-v3.2")  # the cost presets agree with parca info
    assert cost.kv_bytes_per_token_per_layer(cfg) == 1152 == load_config(tmp_path).kv_bytes_per_token_per_layer
    assert cost.indexer_bytes_per_token_per_layer(sc, "fp8") == 132
    assert info["memory"]["cache"] < 20 * 2**30  # 61 x 1152 B x 163840 tokens (+ indexer keys), not a GQA estimate
