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
plus two directories of a small CNN (see make_conv below):
  hra_conv/   peft_type HRA, r = 3, apply_GS = false, modules "net.conv" (nn.Conv2d) and
              "net.fc" (nn.Linear)
  lora_conv/  peft_type LORA, r = 2, lora_alpha = 4, the same two modules
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
  huggingface/peft src/peft/tuners/hra/layer.py, HRAConv2d: hra_u (in_channels * kh * kw, r),
    the kernel square; get_delta_weight builds H as for a linear layer and the merged weight is
    (W.view(out, -1) @ H).view(W.shape); the forward is F.conv2d with that weight and the base
    layer's bias, stride and padding.
  huggingface/peft src/peft/tuners/lora/layer.py, Conv2d: lora_A a convolution
    (in_channels -> r) with the base kernel, stride and padding, no bias, weight (r, C_in, kh,
    kw); lora_B a 1x1 convolution (r -> out), weight (C_out, r, 1, 1); the unmerged forward
    base(x) + lora_B(lora_A(dropout(x))) * scaling.
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


class ConvNet(torch.nn.Module):
    """3 x 5 x 5 images -> conv 3 -> 4 channels, 3 x 3, padding 1 (with bias) -> flatten (C, H,
    W order) -> fc 100 -> 3 (with bias): a kernel and geometry PEFT's HRA and LoRA conv layers
    both accept."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(100, 3)


class ConvModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ConvNet()


def conv_forward(x, conv_weight, conv_bias, fc_weight, fc_bias):
    """y = fc(flatten(conv(x))) for x (n, 3, 5, 5), all float64."""
    h = torch.nn.functional.conv2d(x, conv_weight, conv_bias, padding=1)
    return torch.nn.functional.linear(h.flatten(1), fc_weight, fc_bias)


def make_conv(out_dir, seed):
    """hra_conv/ and lora_conv/: the same base CNN, one HRA and one LoRA adapter on both layers.

    Expected tensors: "<module>.weight" as weight.view(out, -1) (the conv's (4, 27)) and
    "<module>.bias", "<module>.merged_weight" (the conv's as weight.view(4, -1) @ H, (4, 27)),
    "x" (n, 75): n images in NCHW memory order, and "y" (n, 3)."""
    torch.manual_seed(seed)
    model = ConvModel()
    conv, fc = model.net.conv, model.net.fc
    base = {"net.conv": (conv.weight.detach().clone(), conv.bias.detach().clone()),
            "net.fc": (fc.weight.detach().clone(), fc.bias.detach().clone())}
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)

    def expected_base():
        out = {"x": x.reshape(2, -1)}
        for module, (weight, bias) in base.items():
            out[module + ".weight"] = weight.double().reshape(weight.shape[0], -1)
            out[module + ".bias"] = bias.double()
        return out

    # HRA, chain variant, r = 3 on both modules (HRAConfig has one r).
    r = 3
    adapter, expected, merged = {}, expected_base(), {}
    for module, (weight, _) in base.items():
        fan_in = weight[0].numel()
        u = (torch.rand(fan_in, r, generator=gen) * 2.0 - 1.0) / math.sqrt(r)
        u = (u + 0.5 * torch.randn(fan_in, r, generator=gen)).to(torch.float32)
        adapter[PREFIX + module + ".hra_u"] = u
        w = weight.double().reshape(weight.shape[0], -1) @ delta_weight(u.double(), False)
        expected[module + ".merged_weight"] = w
        merged[module] = w.reshape(weight.shape)
    expected["y"] = conv_forward(x, merged["net.conv"], base["net.conv"][1].double(),
                                 merged["net.fc"], base["net.fc"][1].double())
    cfg = hra_config(r, False, init_weights=True)
    cfg["target_modules"] = ["conv", "fc"]
    write_case(out_dir, "hra_conv", cfg, adapter, expected)

    # LoRA r = 2, alpha = 4 (scaling 2), computed as PEFT's unmerged forward.
    r, alpha = 2, 4
    scaling = alpha / r
    adapter, expected = {}, expected_base()
    a_conv = (0.3 * torch.randn(r, 3, 3, 3, generator=gen)).to(torch.float32)
    b_conv = (0.3 * torch.randn(4, r, 1, 1, generator=gen)).to(torch.float32)
    a_fc = (0.1 * torch.randn(r, 100, generator=gen)).to(torch.float32)
    b_fc = (0.3 * torch.randn(3, r, generator=gen)).to(torch.float32)
    adapter[PREFIX + "net.conv.lora_A.weight"] = a_conv
    adapter[PREFIX + "net.conv.lora_B.weight"] = b_conv
    adapter[PREFIX + "net.fc.lora_A.weight"] = a_fc
    adapter[PREFIX + "net.fc.lora_B.weight"] = b_fc
    (wc, bc), (wf, bf) = base["net.conv"], base["net.fc"]
    f = torch.nn.functional
    h = f.conv2d(x, wc.double(), bc.double(), padding=1)
    h = h + f.conv2d(f.conv2d(x, a_conv.double(), None, padding=1), b_conv.double()) * scaling
    h = h.flatten(1)
    y = f.linear(h, wf.double(), bf.double())
    y = y + f.linear(f.linear(h, a_fc.double()), b_fc.double()) * scaling
    expected["y"] = y
    expected["net.conv.merged_weight"] = (wc.double().reshape(4, -1) + scaling *
                                          (b_conv.double().reshape(4, r) @
                                           a_conv.double().reshape(r, -1)))
    expected["net.fc.merged_weight"] = wf.double() + scaling * (b_fc.double() @ a_fc.double())
    cfg = lora_config(r, alpha, 0.0, "none")
    cfg["target_modules"] = ["conv", "fc"]
    write_case(out_dir, "lora_conv", cfg, adapter, expected)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures",
                                                                  "peft_adapter")
    os.makedirs(out_dir, exist_ok=True)
    make_hra(out_dir, "hra_chain", r=4, apply_gs=False, seed=1234)
    make_hra(out_dir, "hra_gs", r=3, apply_gs=True, seed=2345)
    make_lora(out_dir, "lora", r=2, alpha=4, seed=3456)
    make_conv(out_dir, seed=4567)
    print("wrote", out_dir)


if __name__ == "__main__":
    main()
