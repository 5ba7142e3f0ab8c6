"""A GGUF file converted once into a model folder: the same logits, the tokenizer with it, cached by content."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # transformers reads GGUF through it (pyproject's test extra installs it)

from llmflow_hpo.recipe.gguf import converted_folder, package_folder  # noqa: E402

HEADS, KV_HEADS = 4, 2
TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", *[f"t{i}" for i in range(35)]]  # 64
# Hugging Face's Llama tensor names -> llama.cpp's (per layer: blk.N.<name>.weight).
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _to_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a q/k projection's rows (its converter permutes them; transformers undoes it)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model, path: Path) -> None:
    """``model`` (a tiny LlamaForCausalLM, tied embeddings) as a float32 GGUF file with a byte-level vocabulary."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))  # control tokens, then normal ones
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        if name in TOP_TENSORS:
            writer.add_tensor(TOP_TENSORS[name], weight)
            continue
        layer, module = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            weight = _to_llama_cpp(weight, HEADS if module == "self_attn.q_proj" else KV_HEADS)
        writer.add_tensor(f"blk.{layer}.{LAYER_TENSORS[module]}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q.gguf"
    write_tiny_gguf(model, path)
    return model, path


def test_the_converted_folder_is_a_plain_model_with_the_same_logits(tiny, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = tiny
    folder = converted_folder(path, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("tiny-Q-")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # a regular folder: no gguf_file, no quantizer
    assert getattr(loaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 6, 7, 30]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer("ab", add_special_tokens=False)["input_ids"]) == ["a", "b"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind


def test_a_second_call_reuses_the_folder_and_another_file_gets_its_own(tiny, tmp_path, monkeypatch) -> None:
    from llmflow_hpo.recipe import gguf as module

    _, path = tiny
    first = converted_folder(path, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(module, "_convert", lambda *a: pytest.fail("converted again"))
    assert converted_folder(path, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    other.write_bytes(path.read_bytes() + b"\0" * 32)  # other bytes (GGUF aligns its data: still readable)
    assert converted_folder(other, tmp_path) != first


def test_a_conversion_that_fails_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    from llmflow_hpo.recipe import gguf as module

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")

    def fail(gguf_path, folder):
        (folder / "half-written").write_text("x")
        raise ValueError("broken file")

    monkeypatch.setattr(module, "_convert", fail)
    with pytest.raises(ValueError, match="broken file"):
        converted_folder(bad, tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        converted_folder(tmp_path / "missing.gguf", tmp_path / "cache")


def test_a_package_folder_is_found_without_importing_it(tmp_path, monkeypatch) -> None:
    package = tmp_path / "exploding_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('its dependencies are not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_folder("exploding_pkg") == package
    assert "exploding_pkg" not in sys.modules
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_folder("no_such_package_here")


def test_a_study_with_model_gguf_file_trains_the_converted_model(tiny, tmp_path) -> None:
    import torch

    from llmflow_hpo.config.study import config_from_dict
    from llmflow_hpo.recipe.models import build_model, load_tokenizer, model_path

    model, path = tiny
    (tmp_path / "space.yaml").write_text("learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3}\n")
    (tmp_path / "train.jsonl").write_text('{"text": "abc"}\n')
    raw = {
        "task": "causal-lm", "study_name": "g", "search_space": "space.yaml", "n_trials": 1,
        "data": {"format": "jsonl", "train": "train.jsonl"},
        "model": {"name_or_path": str(path.parent), "gguf_file": path.name},
        "cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip
    cfg = config_from_dict(raw, source="study.yaml", base=tmp_path)
    assert cfg.model.gguf_cache_dir == str(tmp_path / "cache")  # the study's cache by default
    folder = model_path(cfg.model)
    assert folder.startswith(str(tmp_path / "cache" / "models" / "tiny-Q-"))
    built = build_model(cfg.model, task="causal-lm", labels=[], hidden_dropout=None, attention_dropout=None).eval()
    ids = torch.tensor([[1, 5, 6, 7, 30]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, built(ids).logits, atol=1e-6)  # the GGUF file's weights
    assert load_tokenizer(cfg.model).eos_token == "</s>"
