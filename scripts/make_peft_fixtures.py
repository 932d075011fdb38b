#!/usr/bin/python3
"""Writes tests/fixtures/peft_*.txt: PEFT's HRA linear layer evaluated with PyTorch in float64.

Run with Debian's python3-torch (hence /usr/bin/python3):

    /usr/bin/python3 scripts/make_peft_fixtures.py [output_dir]

The C++ test tests/test_peft_fixtures.cpp reads the files; Python is not needed at test time.

What is restated here (our own code, written from PEFT's source, not copied):
  huggingface/peft, src/peft/tuners/hra/layer.py
    - HRALinear.get_delta_weight(adapter, reverse): with apply_GS=False the columns of hra_u
      (in_features x r) are normalised and H = I, then H <- H - 2 (H u_i) u_i^T for i = 0..r-1
      (r-1..0 when reverse=True), i.e. H = H_1 H_2 ... H_r; with apply_GS=True, Q = modified
      Gram-Schmidt of hra_u (each column minus its projections on the previous unit vectors,
      then normalised) and H = I - 2 Q Q^T (reverse is ignored: H is symmetric).
    - HRALinear.forward (unmerged): new_weight = W @ H and result = F.linear(x, new_weight, b),
      i.e. y = x @ (W @ H)^T + b with x of shape (n, in_features), one sample per row.
The gradients of L = sum(G * y) with respect to hra_u and x come from torch.autograd.

File format (plain text, "# ..." lines are comments):
    case <name>
    apply_GS <0|1>
    init <random|symmetric>
    d_in <int>  d_out <int>  r <int>  n <int>      (one "key value" pair per line)
    matrix <name> <rows> <cols>
    <rows lines of <cols> values each>
    ...
    end
Every matrix is written ROW-MAJOR, row by row, exactly as the PyTorch tensor is laid out and
printed: weight is (d_out, d_in), hra_u is (d_in, r), x / grad_x are (n, d_in), grad_output /
output are (n, d_out), bias is (1, d_out). Eigen's column-major d x n batch is the transpose of
the (n, d) PyTorch activation. Values have 17 significant digits, so they round-trip exactly.
"""

import os
import sys

import torch

FORMAT_VERSION = 1


def delta_weight(hra_u, apply_gs, reverse=False):
    """PEFT's get_delta_weight for one adapter: the d_in x d_in orthogonal H."""
    d, r = hra_u.shape
    eye = torch.eye(d, dtype=hra_u.dtype)
    if apply_gs:
        basis = []
        for i in range(r):
            v = hra_u[:, i : i + 1]
            for q in basis:  # modified Gram-Schmidt: project the running vector
                v = v - (q.t() @ v) * q
            basis.append(v / v.norm())
        q = torch.cat(basis, dim=1)
        return eye - 2.0 * (q @ q.t())
    unit = hra_u / hra_u.norm(dim=0)
    h = eye
    order = range(r - 1, -1, -1) if reverse else range(r)
    for i in order:
        v = unit[:, i : i + 1]
        h = h - 2.0 * (h @ v) @ v.t()  # h <- h (I - 2 v v^T)
    return h


def linear_forward(x, weight, bias, hra_u, apply_gs):
    """PEFT's unmerged HRALinear.forward: F.linear(x, W @ H, b)."""
    return torch.nn.functional.linear(x, weight @ delta_weight(hra_u, apply_gs), bias)


def symmetric_init(d, r, gen):
    """PEFT's init_weights=True for even r: r/2 columns, each repeated (u_1=u_2, u_3=u_4, ...)."""
    bound = 1.0 / (r // 2) ** 0.5  # kaiming_uniform(a=sqrt(5)) on a (d, r/2) tensor
    half = (torch.rand(d, r // 2, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound
    return torch.repeat_interleave(half, 2, dim=1)


# (name, apply_GS, init, d_in, d_out, r, n, seed); d_out != d_in everywhere.
CASES = [
    ("chain_din5_dout7_r1_n1", False, "random", 5, 7, 1, 1, 101),
    ("chain_din8_dout6_r2_n3", False, "random", 8, 6, 2, 3, 102),
    ("chain_din7_dout9_r3_n1", False, "random", 7, 9, 3, 1, 103),
    ("chain_din10_dout4_r4_n3", False, "random", 10, 4, 4, 3, 104),
    ("chain_din6_dout8_r6_n3", False, "random", 6, 8, 6, 3, 105),
    ("chain_din12_dout5_r12_n1", False, "random", 12, 5, 12, 1, 106),
    ("chain_symmetric_din8_dout5_r4_n3", False, "symmetric", 8, 5, 4, 3, 107),
    ("gs_din5_dout7_r1_n3", True, "random", 5, 7, 1, 3, 201),
    ("gs_din8_dout6_r2_n1", True, "random", 8, 6, 2, 1, 202),
    ("gs_din9_dout11_r3_n3", True, "random", 9, 11, 3, 3, 203),
    ("gs_din12_dout7_r4_n1", True, "random", 12, 7, 4, 1, 204),
    ("gs_din6_dout5_r6_n3", True, "random", 6, 5, 6, 3, 205),
]


def write_matrix(out, name, t):
    t = t.detach()
    if t.dim() == 1:
        t = t.reshape(1, -1)
    rows, cols = t.shape
    out.write(f"matrix {name} {rows} {cols}\n")
    for i in range(rows):
        out.write(" ".join(f"{float(v):.17g}" for v in t[i].tolist()) + "\n")


def make_case(name, apply_gs, init, d_in, d_out, r, n, seed):
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    if init == "symmetric":
        hra_u = symmetric_init(d_in, r, gen)
    else:
        hra_u = torch.randn(d_in, r, generator=gen, dtype=f64)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=f64) / d_in**0.5
    bias = torch.randn(d_out, generator=gen, dtype=f64)
    x = torch.randn(n, d_in, generator=gen, dtype=f64)
    grad_output = torch.randn(n, d_out, generator=gen, dtype=f64)

    hra_u.requires_grad_(True)
    x.requires_grad_(True)
    y = linear_forward(x, weight, bias, hra_u, apply_gs)
    loss = (grad_output * y).sum()
    loss.backward()

    with torch.no_grad():
        delta = delta_weight(hra_u, apply_gs)
        delta_rev = delta_weight(hra_u, apply_gs, reverse=True)
        # Sanity of the restatement itself: H is orthogonal and reversing the order gives H^T.
        eye = torch.eye(d_in, dtype=f64)
        assert torch.allclose(delta.t() @ delta, eye, rtol=0.0, atol=1e-12), name
        assert torch.allclose(delta_rev, delta.t(), rtol=0.0, atol=1e-12), name
    return {
        "hra_u": hra_u,
        "weight": weight,
        "bias": bias.reshape(1, -1),
        "x": x,
        "grad_output": grad_output,
        "delta_weight": delta,
        "delta_weight_reverse": delta_rev,
        "output": y,
        "grad_hra_u": hra_u.grad,
        "grad_x": x.grad,
    }


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    for name, apply_gs, init, d_in, d_out, r, n, seed in CASES:
        mats = make_case(name, apply_gs, init, d_in, d_out, r, n, seed)
        path = os.path.join(out_dir, f"peft_{name}.txt")
        with open(path, "w", encoding="ascii") as out:
            out.write(f"# hra PEFT HRA fixture, format {FORMAT_VERSION}; written by "
                      f"scripts/make_peft_fixtures.py with torch {torch.__version__}, float64.\n")
            out.write("# Matrices are row-major (PyTorch layout): activations are (n, d), one "
                      "sample per row.\n")
            out.write(f"case {name}\napply_GS {int(apply_gs)}\ninit {init}\n")
            out.write(f"d_in {d_in}\nd_out {d_out}\nr {r}\nn {n}\n")
            for key, value in mats.items():
                write_matrix(out, key, value)
            out.write("end\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
