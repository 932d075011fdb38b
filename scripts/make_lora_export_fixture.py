#!/usr/bin/python3
"""Writes tests/fixtures/lora_export/: an HRA -> LoRA export and PEFT's LoRA formula applied to it.

Run with Debian's python3-torch (hence /usr/bin/python3; neither `peft` nor `safetensors` is
needed, the file format is parsed below), after building the C++ test program that writes the
export:

    cmake --build build/w --target test_lora_export
    /usr/bin/python3 scripts/make_lora_export_fixture.py build/w/tests/test_lora_export

Steps:
  1. The C++ program's hidden test "write the LoRA-export fixture" writes
     hra.safetensors (F64): per module "<module>.weight" (out, in) and "<module>.hra_u.<adapter>"
     (in, r), with metadata "<module>" = the adapters in stacking order ("default:chain,b:gs"),
     and lora/ (adapter_config.json, adapter_model.safetensors): those layers exported as a PEFT
     LoRA adapter in F64 by hra::peft::export_lora_adapters.
  2. This script reads both and writes expected.safetensors (F64), per module
     "<module>.lora_merged" = W + scaling * B @ A, PEFT's LoRA merge (scaling = lora_alpha / r,
     the module's rank_pattern / alpha_pattern entry when it has one),
     "<module>.llama_cpp_merged" = W + (lora_alpha / rank) * B @ A, llama.cpp's scale (one
     lora_alpha for the whole adapter, the rank read from the tensor), and
     "<module>.peft_hra_merged" = W @ H_a @ H_b ... with PEFT's HRA get_delta_weight, as an
     independent check; it fails if any two differ by more than 1e-12.
The C++ test tests/test_lora_export.cpp compares both with the library's W H (merge()) to 1e-12;
Python is not needed at test time.

What is restated from PEFT (our own code, written from its source, not copied):
  huggingface/peft src/peft/tuners/lora/layer.py, Linear.get_delta_weight: B @ A * scaling,
    scaling = lora_alpha / r (use_rslora: / sqrt(r)); lora_A.weight (r, in), lora_B.weight
    (out, r); merge: W + delta.
  huggingface/peft src/peft/tuners/tuners_utils.py / utils/other.py, get_pattern_key: a
    rank_pattern / alpha_pattern key applies to a module whose name matches
    re.match(rf"(.*\\.)?({key})$", name).
  huggingface/peft src/peft/tuners/hra/layer.py, HRALinear.get_delta_weight (see
    scripts/make_peft_adapter_fixture.py for the chain and Gram-Schmidt forms).
  ggml-org/llama.cpp convert_lora_to_gguf.py: adapter.lora.alpha = the config's top-level
    lora_alpha (rank_pattern / alpha_pattern are not read); src/llama-adapter.h,
    llama_adapter_lora_weight::get_scale: scale = alpha / rank, rank = the tensor's own
    (b->ne[0]).
"""

import json
import os
import re
import struct
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_peft_adapter_fixture import delta_weight, safetensors_bytes, write_bytes  # noqa: E402

PREFIX = "base_model.model."
_READ = {"F64": ("<d", 8, torch.float64), "F32": ("<f", 4, torch.float32)}


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file with F64 / F32 tensors."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        fmt, size, dtype = _READ[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // size
        values = struct.unpack("<%d%s" % (count, fmt[1]), body[begin:end])
        tensors[name] = torch.tensor(values, dtype=torch.float64).reshape(info["shape"]).to(dtype)
    return tensors, metadata


def pattern_value(patterns, module, default):
    """PEFT's get_pattern_key: the first key matching a suffix of the module name."""
    for key, value in patterns.items():
        if re.match(r"(.*\.)?(%s)$" % key, module):
            return value
    return default


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(root, "tests", "fixtures", "lora_export")
    subprocess.run([sys.argv[1], "[.make_lora_export_fixture]"], check=True)

    hra, spec = read_safetensors(os.path.join(out_dir, "hra.safetensors"))
    lora, _ = read_safetensors(os.path.join(out_dir, "lora", "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "lora", "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and not config["use_rslora"]

    expected = {}
    for module, adapters in sorted(spec.items()):
        if module == "format":
            continue
        w = hra[module + ".weight"].double()
        a = lora[PREFIX + module + ".lora_A.weight"].double()
        b = lora[PREFIX + module + ".lora_B.weight"].double()
        r = pattern_value(config["rank_pattern"], module, config["r"])
        alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r)
        lora_merged = w + (alpha / r) * (b @ a)
        llama_cpp_merged = w + (config["lora_alpha"] / b.shape[1]) * (b @ a)
        h = torch.eye(w.shape[1], dtype=torch.float64)
        for item in adapters.split(","):
            name, variant = item.split(":")
            h = h @ delta_weight(hra[module + ".hra_u." + name].double(), variant == "gs")
        peft_hra = w @ h
        max_wh = peft_hra.abs().max().item()
        diff = (lora_merged - peft_hra).abs().max().item() / max_wh
        diff_llama = (llama_cpp_merged - peft_hra).abs().max().item() / max_wh
        print("%s: r = %d, lora_alpha = %g, max|W + s B A - W H| / max|W H| = %.3e (PEFT), "
              "%.3e (llama.cpp)" % (module, r, alpha, diff, diff_llama))
        assert diff < 1e-12 and diff_llama < 1e-12, module
        expected[module + ".lora_merged"] = lora_merged
        expected[module + ".llama_cpp_merged"] = llama_cpp_merged
        expected[module + ".peft_hra_merged"] = peft_hra
    write_bytes(os.path.join(out_dir, "expected.safetensors"), safetensors_bytes(expected, None))
    print("wrote", out_dir)


if __name__ == "__main__":
    main()
