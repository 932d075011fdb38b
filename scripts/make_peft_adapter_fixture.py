#!/usr/bin/python3
"""Writes tests/fixtures/peft_adapter/: PEFT adapter directories for a tiny model, as PEFT saves them.

Run with Debian's python3-torch (hence /usr/bin/python3; neither `peft` nor `safetensors` is
needed, both are restated below):

    /usr/bin/python3 scripts/make_peft_adapter_fixture.py [output_dir]

The C++ test tests/test_adapter_io.cpp loads the directories with hra/io/peft_load.hpp, merges
them and compares with the float64 results written here; Python is not needed at test time.

The model: an outer module holding `net`, which holds two nn.Linear layers with bias,
`fc1` (6 -> 5) and `fc2` (5 -> 3), so PEFT names the adapted modules "net.fc1" and "net.fc2".
Base weights are float32 (PyTorch's default nn.Linear init from a fixed seed); the adapter
tensors are float32 random values standing in for trained ones (not PEFT's symmetric init,
under which H = I and the test could not fail).

Three adapter directories, each with `adapter_config.json` and `adapter_model.safetensors`:
  hra_chain/  peft_type HRA, r = 4, apply_GS = false
  hra_gs/     peft_type HRA, r = 3, apply_GS = true (init_weights = false, as GS needs)
  lora/       peft_type LORA, r = 2, lora_alpha = 4, bias = "all" (trained biases saved)
and beside each `<name>.expected.safetensors` (F64): for every module "<module>.weight" and
"<module>.bias" (the base layer, the float32 values widened exactly), "<module>.merged_weight"
(the merged weight computed in float64 from the float32 tensors of the adapter file), for LoRA
"<module>.trained_bias", and "x" (4, 6) / "y" (4, 3): the adapted model's unmerged forward
y = fc2(fc1(x)) in float64 (one sample per row, PyTorch's layout).

What is restated from PEFT (our own code, written from its source, not copied):
  huggingface/peft src/peft/tuners/hra/layer.py
    - HRALayer.update_layer: hra_u[adapter] has shape (in_features, r).
    - HRALinear.get_delta_weight: apply_GS=False: columns of hra_u normalised, H = I, then
      H <- H - 2 (H u_i) u_i^T for i = 0..r-1, i.e. H = H_1 ... H_r; apply_GS=True: modified
      Gram-Schmidt of the columns in order, then H = I - 2 Q Q^T.
    - HRALinear.merge: W <- W @ H; forward (unmerged): F.linear(x, W @ H, b).
  huggingface/peft src/peft/tuners/lora/layer.py: merged W + scaling * B @ A with
    scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), lora_A.weight (r, in),
    lora_B.weight (out, r).
  huggingface/peft src/peft/utils/save_and_load.py, get_peft_model_state_dict: keys are the
    model's state_dict keys "base_model.model.<module>.hra_u.<adapter>" and
    "base_model.model.<module>.lora_A.<adapter>.weight" with ".<adapter>" removed; HRA goes
    through the generic branch (keys containing "hra_"), so no bias is ever saved for HRA; LoRA
    with bias="all" adds every key containing "bias", i.e. "<module>.base_layer.bias" for the
    wrapped layers.
  huggingface/peft src/peft/config.py, PeftConfigMixin.save_pretrained: the config dataclass
    as a dict (sets as lists), json.dumps(indent=2, sort_keys=True); PeftModel.save_pretrained
    sets inference_mode = True while saving. Fields: PeftConfig (task_type, peft_type,
    auto_mapping, peft_version, base_model_name_or_path, revision, inference_mode) plus
    HRAConfig (r, apply_GS, target_modules, exclude_modules, init_weights, layers_to_transform,
    layers_pattern, bias, modules_to_save) or LoraConfig's fields.
  The safetensors format as huggingface/safetensors writes it: 8-byte little-endian header
    length, a compact JSON header ("__metadata__" first, then the tensors in data order, each
    {"dtype", "shape", "data_offsets"}), padded with spaces to a multiple of 8 bytes; data
    little-endian, row-major, tensors ordered by decreasing dtype then by name. PEFT passes
    metadata {"format": "pt"}.
"""

import json
import math
import os
import struct
import sys

import torch

PEFT_VERSION = "0.20.0"  # the version whose config fields are listed below
PREFIX = "base_model.model."
MODULES = [("net.fc1", 6, 5), ("net.fc2", 5, 3)]  # (name, in_features, out_features)

_DTYPES = {torch.float64: ("F64", "<d", 8), torch.float32: ("F32", "<f", 4)}


def safetensors_bytes(tensors, metadata):
    """The bytes of a safetensors file holding `tensors` (name -> tensor) and `metadata`."""
    order = sorted(tensors.items(), key=lambda kv: (-_DTYPES[kv[1].dtype][2], kv[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    chunks = []
    offset = 0
    for name, tensor in order:
        dtype, fmt, size = _DTYPES[tensor.dtype]
        values = tensor.contiguous().reshape(-1).tolist()
        data = struct.pack("<%d%s" % (len(values), fmt[1]), *values)
        assert len(data) == len(values) * size
        header[name] = {"dtype": dtype, "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def delta_weight(hra_u, apply_gs):
    """PEFT's HRA get_delta_weight: the (in, in) orthogonal H for hra_u (in, r)."""
    d, r = hra_u.shape
    eye = torch.eye(d, dtype=hra_u.dtype)
    if apply_gs:
        basis = []
        for i in range(r):
            v = hra_u[:, i:i + 1]
            for q in basis:
                v = v - (q.t() @ v) * q
            basis.append(v / v.norm())
        q = torch.cat(basis, dim=1)
        return eye - 2.0 * (q @ q.t())
    unit = hra_u / hra_u.norm(dim=0)
    h = eye
    for i in range(r):
        v = unit[:, i:i + 1]
        h = h - 2.0 * (h @ v) @ v.t()
    return h


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 3)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()


def base_model(seed):
    torch.manual_seed(seed)
    model = Model()
    return {name: (module.weight.detach().clone(), module.bias.detach().clone())
            for name, module in (("net.fc1", model.net.fc1), ("net.fc2", model.net.fc2))}


def common_config(peft_type):
    """PeftConfig's fields as PeftModel.save_pretrained writes them."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "peft_type": peft_type,
        "peft_version": PEFT_VERSION,
        "revision": None,
        "task_type": None,
    }


def hra_config(r, apply_gs, init_weights):
    cfg = common_config("HRA")
    cfg.update({
        "apply_GS": apply_gs,
        "bias": "none",
        "exclude_modules": None,
        "init_weights": init_weights,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "r": r,
        "target_modules": ["fc1", "fc2"],  # as a user passes them: suffixes of module names
    })
    return cfg


def lora_config(r, alpha, dropout, bias):
    cfg = common_config("LORA")
    cfg.update({
        "alpha_pattern": {},
        "bias": bias,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "r": r,
        "rank_pattern": {},
        "target_modules": ["fc1", "fc2"],
        "use_dora": False,
        "use_rslora": False,
    })
    return cfg


def forward(x, layers):
    """y = fc2(fc1(x)) with x (n, 6), one sample per row; layers: [(weight, bias)]."""
    for weight, bias in layers:
        x = torch.nn.functional.linear(x, weight, bias)
    return x


def write_case(out_dir, name, config, adapter, expected):
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    write_bytes(os.path.join(case_dir, "adapter_model.safetensors"),
                safetensors_bytes(adapter, {"format": "pt"}))
    with open(os.path.join(case_dir, "adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
    write_bytes(os.path.join(out_dir, name + ".expected.safetensors"),
                safetensors_bytes(expected, None))


def make_hra(out_dir, name, r, apply_gs, seed):
    base = base_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    adapter, expected, layers = {}, {}, []
    for module, d_in, _ in MODULES:
        weight, bias = base[module]
        # Uniform in +-1/sqrt(r) (PEFT's kaiming-uniform bound) plus an offset per column, so
        # the columns are far from parallel and from PEFT's symmetric (H = I) start.
        u = (torch.rand(d_in, r, generator=gen) * 2.0 - 1.0) / math.sqrt(r)
        u += 0.5 * torch.randn(d_in, r, generator=gen)
        u = u.to(torch.float32)
        adapter[PREFIX + module + ".hra_u"] = u
        merged = weight.double() @ delta_weight(u.double(), apply_gs)
        expected[module + ".weight"] = weight.double()
        expected[module + ".bias"] = bias.double()
        expected[module + ".merged_weight"] = merged
        layers.append((merged, bias.double()))
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    expected["x"] = x
    expected["y"] = forward(x, layers)
    write_case(out_dir, name, hra_config(r, apply_gs, init_weights=not apply_gs), adapter,
               expected)


def make_lora(out_dir, name, r, alpha, seed):
    base = base_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    scaling = alpha / r
    adapter, expected, layers = {}, {}, []
    for module, d_in, d_out in MODULES:
        weight, bias = base[module]
        a = ((torch.rand(r, d_in, generator=gen) * 2.0 - 1.0) / math.sqrt(d_in)).to(torch.float32)
        b = (0.3 * torch.randn(d_out, r, generator=gen)).to(torch.float32)  # trained: non-zero
        trained_bias = (bias + 0.1 * torch.randn(d_out, generator=gen)).to(torch.float32)
        adapter[PREFIX + module + ".lora_A.weight"] = a
        adapter[PREFIX + module + ".lora_B.weight"] = b
        adapter[PREFIX + module + ".base_layer.bias"] = trained_bias  # bias="all"
        merged = weight.double() + scaling * (b.double() @ a.double())
        expected[module + ".weight"] = weight.double()
        expected[module + ".bias"] = bias.double()
        expected[module + ".trained_bias"] = trained_bias.double()
        expected[module + ".merged_weight"] = merged
        layers.append((merged, trained_bias.double()))
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    expected["x"] = x
    expected["y"] = forward(x, layers)
    write_case(out_dir, name, lora_config(r, alpha, 0.1, "all"), adapter, expected)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures",
                                                                  "peft_adapter")
    os.makedirs(out_dir, exist_ok=True)
    make_hra(out_dir, "hra_chain", r=4, apply_gs=False, seed=1234)
    make_hra(out_dir, "hra_gs", r=3, apply_gs=True, seed=2345)
    make_lora(out_dir, "lora", r=2, alpha=4, seed=3456)
    print("wrote", out_dir)


if __name__ == "__main__":
    main()
