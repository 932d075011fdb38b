#!/usr/bin/python3
"""Writes tests/fixtures/peft_conv_*.txt: PEFT's HRA and LoRA on nn.Conv2d, evaluated with
PyTorch's F.conv2d and autograd in float64.

Run with Debian's python3-torch (hence /usr/bin/python3):

    /usr/bin/python3 scripts/make_peft_conv_fixtures.py [output_dir]

tests/test_conv2d.cpp, tests/test_hra_conv2d.cpp and tests/test_lora_conv2d.cpp read the files;
Python is not needed at test time. The format is that of scripts/make_peft_fixtures.py (whose
PEFT restatements, delta_weight and write_matrix, are imported from there).

What is computed (our own code, written from PEFT's source, not copied):
  huggingface/peft, src/peft/tuners/hra/layer.py, HRAConv2d.forward (unmerged): the conv weight
    is viewed as (C_out, C_in/groups * kh * kw), multiplied on the right by the D x D H of
    get_delta_weight (both variants), viewed back, and the input goes through F.conv2d with it.
    PEFT itself passes only padding[0] and stride[0] and assumes a square kernel; here F.conv2d
    gets every parameter of the base layer (per-axis stride and padding, dilation, groups), and
    a fully asymmetric padding (top, bottom, left, right) is F.pad followed by a conv without
    padding, as PyTorch expresses it.
  huggingface/peft, src/peft/tuners/lora/layer.py, _ConvNd / Conv2d: result = base(x) +
    lora_B(lora_A(dropout(x))) * scaling with lora_A a conv (r output channels) with the base
    kernel, stride and padding, lora_B a 1x1 conv, scaling = lora_alpha / r; get_delta_weight for
    a non-1x1 kernel is conv2d(lora_A.weight.transpose(0, 1), lora_B.weight).transpose(0, 1) *
    scaling. For groups = 1 and dilation 1 (the "peft" LoRA cases) the fixture is exactly that.
    For groups > 1 or dilation > 1 PEFT differs from hra (its lora_A ignores dilation and sees
    all C_in channels; it cannot merge), so those cases hold hra's definition instead, computed
    two independent ways: F.conv2d with the merged weight W + s B A (C_out, C_in/groups, kh, kw),
    and A as a grouped conv (A repeated per group) followed by B as a grouped 1x1 conv.
The gradients of L = sum(grad_output * y) come from torch.autograd.

Layout (row-major, PyTorch's): x / grad_x are (n, C_in*H*W), one NCHW image per row;
output / grad_output are (n, C_out*H_out*W_out); weight is (C_out, D) = weight.view(C_out, -1);
hra_u is (D, r); lora_A is (r, D) = lora_A.weight.view(r, -1); lora_B is (C_out, r); bias rows
are (1, C_out).
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_peft_fixtures import delta_weight, write_matrix  # noqa: E402

FORMAT_VERSION = 1


class Geometry:
    def __init__(self, c_in, h, w, c_out, kh, kw, stride=(1, 1), pad=(0, 0, 0, 0),
                 dilation=(1, 1), groups=1):
        self.c_in, self.h, self.w, self.c_out, self.kh, self.kw = c_in, h, w, c_out, kh, kw
        self.stride, self.pad, self.dilation, self.groups = stride, pad, dilation, groups

    @property
    def d(self):
        return self.c_in // self.groups * self.kh * self.kw

    def symmetric(self):
        top, bottom, left, right = self.pad
        return top == bottom and left == right

    def conv(self, x, weight, bias=None, groups=None):
        """F.conv2d honouring every parameter; asymmetric padding as F.pad then conv."""
        groups = self.groups if groups is None else groups
        top, bottom, left, right = self.pad
        if self.symmetric():
            return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)

    def fields(self):
        top, bottom, left, right = self.pad
        return [("C_in", self.c_in), ("H", self.h), ("W", self.w), ("C_out", self.c_out),
                ("kernel_h", self.kh), ("kernel_w", self.kw), ("stride_h", self.stride[0]),
                ("stride_w", self.stride[1]), ("pad_top", top), ("pad_bottom", bottom),
                ("pad_left", left), ("pad_right", right), ("dilation_h", self.dilation[0]),
                ("dilation_w", self.dilation[1]), ("groups", self.groups)]


G = Geometry
GEOMETRIES = {
    "k3_pad1": G(2, 4, 4, 2, 3, 3, pad=(1, 1, 1, 1)),
    "k3x2_stride2x1_asympad": G(2, 5, 4, 2, 3, 2, stride=(2, 1), pad=(1, 0, 2, 1)),
    "dilation2_groups2": G(4, 4, 4, 2, 3, 3, pad=(2, 2, 1, 1), dilation=(2, 1), groups=2),
    "depthwise": G(3, 4, 4, 3, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), groups=3),
    "1x1": G(3, 3, 3, 2, 1, 1),
}

# (geometry, apply_GS, r, n, with_frozen); r = D for the 1x1 (D = 3).
HRA_CASES = [
    ("k3_pad1", False, 4, 2, True),
    ("k3x2_stride2x1_asympad", False, 3, 1, True),
    ("dilation2_groups2", False, 2, 1, True),
    ("depthwise", False, 3, 1, False),
    ("1x1", False, 3, 2, False),
    ("k3_pad1", True, 3, 1, False),
    ("dilation2_groups2", True, 4, 1, False),
    ("depthwise", True, 2, 2, False),
]
# (geometry, r, alpha, n); the first two are PEFT's own lora.Conv2d (groups 1, dilation 1).
LORA_CASES = [
    ("k3_pad1", 2, 6.0, 2),
    ("1x1", 2, 3.0, 1),
    ("dilation2_groups2", 2, 4.0, 1),
    ("depthwise", 2, 2.0, 1),
]


def inputs(geo, n, gen):
    f64 = torch.float64
    weight = torch.randn(geo.c_out, geo.d, generator=gen, dtype=f64) / geo.d**0.5
    bias = torch.randn(geo.c_out, generator=gen, dtype=f64)
    x = torch.randn(n, geo.c_in, geo.h, geo.w, generator=gen, dtype=f64)
    return weight, bias, x


def kernel(geo, flat):
    """(C_out, D) -> (C_out, C_in/groups, kh, kw), PEFT's view back."""
    return flat.reshape(flat.shape[0], geo.c_in // geo.groups, geo.kh, geo.kw)


def rows(t):
    return t.detach().reshape(t.shape[0], -1)


def hra_case(name, apply_gs, r, n, with_frozen, seed):
    geo = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    weight, bias, x = inputs(geo, n, gen)
    hra_u = torch.randn(geo.d, r, generator=gen, dtype=torch.float64)
    out = {}
    mats = {"weight": weight, "bias": bias.reshape(1, -1), "hra_u": hra_u.clone()}
    if with_frozen:
        xf, wf, bf = x.clone().requires_grad_(True), weight.clone().requires_grad_(True), \
            bias.clone().requires_grad_(True)
        y = geo.conv(xf, kernel(geo, wf), bf)
        grad_output = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (grad_output * y).sum().backward()
        out.update({"frozen_output": rows(y), "frozen_grad_x": rows(xf.grad),
                    "frozen_grad_weight": wf.grad, "frozen_grad_bias": bf.grad.reshape(1, -1)})
    x.requires_grad_(True)
    hra_u.requires_grad_(True)
    bias.requires_grad_(True)
    # PEFT's HRAConv2d.forward: new_weight = W.view(C_out, -1) @ H, viewed back, then conv.
    merged = weight @ delta_weight(hra_u, apply_gs)
    y = geo.conv(x, kernel(geo, merged), bias)
    if not with_frozen:
        grad_output = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (grad_output * y).sum().backward()
    mats.update({"x": rows(x), "grad_output": rows(grad_output), "merged_weight": merged,
                 "output": rows(y), "grad_x": rows(x.grad), "grad_hra_u": hra_u.grad,
                 "grad_bias": bias.grad.reshape(1, -1)})
    mats.update(out)
    fields = [("kind", "hra"), ("apply_GS", int(apply_gs)), ("r", r), ("n", n)]
    return fields + geo.fields(), mats


def lora_case(name, r, alpha, n, seed):
    geo = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    weight, bias, x = inputs(geo, n, gen)
    lora_a = torch.randn(r, geo.d, generator=gen, dtype=torch.float64) / geo.d**0.5
    lora_b = torch.randn(geo.c_out, r, generator=gen, dtype=torch.float64)
    scaling = alpha / r
    peft = geo.groups == 1 and geo.dilation == (1, 1)
    for t in (x, lora_a, lora_b, bias):
        t.requires_grad_(True)
    base = geo.conv(x, kernel(geo, weight), bias)
    a4 = lora_a.reshape(r, geo.c_in // geo.groups, geo.kh, geo.kw)
    b4 = lora_b.reshape(geo.c_out, r, 1, 1)
    if peft:
        # PEFT's lora.Conv2d: lora_B(lora_A(x)) * scaling, lora_A with the base stride/padding.
        y = base + F.conv2d(geo.conv(x, a4), b4) * scaling
        with torch.no_grad():
            if (geo.kh, geo.kw) == (1, 1):
                delta = (lora_b @ lora_a).reshape(geo.c_out, -1, 1, 1) * scaling
            else:
                delta = F.conv2d(a4.transpose(0, 1), b4).transpose(0, 1) * scaling
    else:
        # hra's exact extension: A on every group's patches, B a grouped 1x1 conv.
        a_groups = a4.repeat(geo.groups, 1, 1, 1)
        y = base + F.conv2d(geo.conv(x, a_groups), b4, groups=geo.groups) * scaling
        with torch.no_grad():
            delta = kernel(geo, scaling * (lora_b @ lora_a))
    with torch.no_grad():
        merged = geo.conv(x, kernel(geo, weight) + delta, bias)
        assert torch.allclose(merged, y, rtol=0.0, atol=1e-12), name
    grad_output = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (grad_output * y).sum().backward()
    mats = {"weight": weight, "bias": bias.detach().reshape(1, -1), "lora_A": lora_a.detach(),
            "lora_B": lora_b.detach(), "x": rows(x), "grad_output": rows(grad_output),
            "delta_weight": rows(delta), "output": rows(y), "grad_x": rows(x.grad),
            "grad_lora_A": lora_a.grad, "grad_lora_B": lora_b.grad,
            "grad_bias": bias.grad.reshape(1, -1)}
    fields = [("kind", "lora"), ("peft_module", int(peft)), ("r", r), ("alpha", alpha),
              ("n", n)]
    return fields + geo.fields(), mats


def write(out_dir, case, fields, mats):
    path = os.path.join(out_dir, f"peft_conv_{case}.txt")
    with open(path, "w", encoding="ascii") as out:
        out.write(f"# hra PEFT conv fixture, format {FORMAT_VERSION}; written by "
                  f"scripts/make_peft_conv_fixtures.py with torch {torch.__version__}, float64.\n")
        out.write("# Matrices are row-major (PyTorch layout): x and outputs are (n, C*H*W), one "
                  "NCHW image per row.\n")
        out.write(f"case {case}\n")
        for key, value in fields:
            out.write(f"{key} {value}\n")
        for key, value in mats.items():
            write_matrix(out, key, value)
        out.write("end\n")
    print(f"wrote {path}")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    for k, (geo, apply_gs, r, n, frozen) in enumerate(HRA_CASES):
        case = f"hra_{'gs' if apply_gs else 'chain'}_{geo}_r{r}_n{n}"
        write(out_dir, case, *hra_case(geo, apply_gs, r, n, frozen, 300 + k))
    for k, (geo, r, alpha, n) in enumerate(LORA_CASES):
        write(out_dir, f"lora_{geo}_r{r}_n{n}", *lora_case(geo, r, alpha, n, 400 + k))


if __name__ == "__main__":
    main()
