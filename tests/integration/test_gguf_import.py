"""GGUF import: a tiny Qwen2 GGUF written here (the real SmolLM2 tokenizer, random fp16 weights)
goes through the same conversion as the registry's Qwen2.5-Coder models, and the converted
model computes what the weights written into the GGUF compute."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=True)


def _tokenizer_fields(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    types = reader.fields["tokenizer.ggml.token_type"]
    return {"tokens": strings("tokenizer.ggml.tokens"), "merges": strings("tokenizer.ggml.merges"),
            "types": [int(types.parts[i][0]) for i in types.data],
            "bos": scalar("tokenizer.ggml.bos_token_id"), "eos": scalar("tokenizer.ggml.eos_token_id")}


def write_tiny_qwen2_gguf(path: Path, tok: dict, seed: int = 0, head_of=None):
    """A 2-layer Qwen2 (q/k/v biases, tied embeddings) as F16 GGUF; returns the reference HF model.
    head_of: also write an `output.weight` = head_of(embedding) (llama.cpp writes a tied model's
    matrix twice, quantized apart); then returns (model, head)."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok["tokens"]), bos_token_id=tok["bos"], eos_token_id=tok["eos"], **TINY)
    ref = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norms and biases; every value exact in fp16
            p.add_(torch.randn_like(p) * 0.02).copy_(p.half().float())
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = ref.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    head = head_of(sd["model.embed_tokens.weight"]) if head_of else None
    if head is not None:
        tensors["output.weight"] = head
    for i in range(TINY["num_hidden_layers"]):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key in sd:
                    tensors[f"blk.{i}.{gg}.{kind}"] = sd[key]
    for name, t in tensors.items():
        arr = t.numpy()
        w.add_tensor(name, arr.astype(np.float16) if arr.ndim == 2 else arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (ref, head) if head_of else ref


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_path):
    from refinery.core.gguf_import import REGISTRY, _packaged_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    ref = write_tiny_qwen2_gguf(path, _tokenizer_fields(_packaged_gguf(REGISTRY["smollm2-135m"])))
    return path, ref


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(model_or_path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32) \
        if isinstance(model_or_path, (str, Path)) else model_or_path
    with torch.no_grad():
        return model(ids).logits


def test_import_cli_converts_a_gguf_that_computes_as_its_weights(tiny_gguf, cache, smollm2_path, capsys):
    from transformers import AutoConfig, AutoTokenizer

    from refinery.core.models import resolve_model
    from refinery.launch.cli import main

    path, ref = tiny_gguf
    assert main(["models", "import", str(path), "--name", "tiny-qwen"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == cache / "models" / "tiny-qwen"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert not getattr(cfg, "quantization_config", None)  # a plain checkpoint, not a GGUF-quantized one
    text = "Where would you put a cup after drinking from it?"
    ids = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(smollm2_path)(text, return_tensors="pt").input_ids.tolist()
    torch.testing.assert_close(_logits(out, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    # the imported name resolves in configs; the file itself resolves to one import, converted once
    assert resolve_model("tiny-qwen") == str(out)
    first = Path(resolve_model(str(path)))
    stamp = (first / "config.json").stat().st_mtime_ns
    assert Path(resolve_model(str(path))) == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in listing and "tiny-qwen" in listing and "imported" in listing


def test_import_refuses_what_is_not_a_gguf(tmp_path, cache, capsys):
    from refinery.launch.cli import main

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert main(["models", "import", str(bad)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["models", "import", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "not a registry name" in capsys.readouterr().err
    assert not (cache / "models").exists() or not any((cache / "models").glob("[!.]*"))


@pytest.mark.parametrize("same_matrix", [True, False])
def test_head_written_apart_is_retied_only_when_it_is_the_same_matrix(tmp_path, cache, same_matrix):
    """llama.cpp stores a tied embedding twice (Q4_K and Q6_K): the same matrix -> one tied matrix
    (the head's copy); an unrelated head stays a separate matrix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from refinery.core.gguf_import import REGISTRY, _packaged_gguf, import_gguf, read_info

    gen = torch.Generator().manual_seed(3)

    def head_of(emb):  # quantization-sized noise on the embedding, or another matrix
        noise = torch.randn(emb.shape, generator=gen) * (0.002 if same_matrix else 0.02)
        return ((emb if same_matrix else 0) + noise).half().float()

    path = tmp_path / "two-copies.gguf"
    ref, head = write_tiny_qwen2_gguf(path, _tokenizer_fields(_packaged_gguf(REGISTRY["smollm2-135m"])),
                                      seed=2, head_of=head_of)
    out = import_gguf(path, "two-copies")
    info = read_info(out)["retied_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert AutoConfig.from_pretrained(out).tie_word_embeddings == same_matrix == info["tied"]
    torch.testing.assert_close(model.lm_head.weight, head)
    if same_matrix:
        assert info["cosine"] > 0.99
        torch.testing.assert_close(model.model.embed_tokens.weight, head)  # the head's (finer) copy
    else:
        assert abs(info["cosine"]) < 0.1
        torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def _wheel(where: Path, dist: str, member: str, data: bytes) -> None:
    """A minimal valid wheel holding one data file (what the registry's part wheels look like)."""
    pkg = dist.replace("-", "_")
    info = f"{pkg}-0.1.dist-info"
    files = {f"{pkg}/__init__.py": b"", f"{pkg}/data/{member}": data,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(where / f"{pkg}-0.1-py3-none-any.whl", "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
        z.writestr(f"{info}/RECORD", record)


def test_registry_joins_wheel_parts_checks_sha_and_converts_once(tiny_gguf, cache, tmp_path):
    from refinery.core.config import ConfigError
    from refinery.core.gguf_import import Registered, materialize

    path, ref = tiny_gguf
    blob = path.read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cut = len(blob) // 3
    for i, chunk in enumerate((blob[:cut], blob[cut:2 * cut], blob[2 * cut:]), 1):
        _wheel(wheels, f"tiny-part{i}", f"part{i:02d}.bin", chunk)
    parts = tuple(f"tiny-part{i}==0.1" for i in (1, 2, 3))
    good = Registered("tiny", "tiny-dir", hashlib.sha256(blob).hexdigest(), wheels=parts)
    wrong = Registered("tiny-wrong", "tiny-wrong-dir", "0" * 64, wheels=parts[::-1])  # parts out of order
    with pytest.raises(ConfigError, match="expected 0000"):
        materialize("tiny-wrong", find_links=str(wheels), registry={"tiny-wrong": wrong})
    assert not (cache / "models" / "tiny-wrong-dir").exists()
    assert not any((cache / "models" / ".tmp").iterdir())  # the joined GGUF and wheels are gone
    out = materialize("tiny", find_links=str(wheels), registry={"tiny": good})
    assert out == cache / "models" / "tiny-dir"
    ids = torch.tensor([[1, 2, 3, 500, 1000]])
    torch.testing.assert_close(_logits(out, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    stamp = (out / "config.json").stat().st_mtime_ns
    assert materialize("tiny", find_links="/nonexistent", registry={"tiny": good}) == out  # cached: no pip
    assert (out / "config.json").stat().st_mtime_ns == stamp
    missing = Registered("gone", "gone-dir", good.sha256, wheels=("tiny-part9==0.1",))
    with pytest.raises(ConfigError, match="could not download the wheels"):
        materialize("gone", find_links=str(wheels), registry={"gone": missing})
