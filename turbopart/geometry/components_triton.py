"""Connected components of an edge list by lock-free union-find in Triton (CUDA).

The clean-up's component labelling (:func:`turbopart.geometry.cleanup.face_components`) over
the face–edge graph of a marching-cubes part: 30 M faces and 45 M face pairs for a foam part
of the plain-init benchmark.  The PyTorch formulation there (min-label propagation with
hooking and pointer jumping) needs six or more passes over every pair and every node;
here each pair is read once:

* ``parent`` starts as the identity; every pair finds the roots of its two nodes (halving
  the path on the way: a node is pointed at its grandparent) and, while they differ, links
  the larger root under the smaller one with a compare-and-swap that succeeds only while
  the larger is still a root; a failed swap means another pair linked it first, so both
  roots are looked up again;
* a last pass stores every node's root.

Links always go from a larger to a smaller index, so parents only decrease, a node that
stops being a root never becomes one again, and the root of a component is its smallest
node: the labels are exactly those of the PyTorch formulation, whatever order the pairs
ran in (the kernel's timing varies, its output does not).  Path halving only ever points a
node at one of its ancestors, so it is safe beside concurrent links.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK = 256


if triton is not None:

    @triton.jit
    def _roots(parent_ptr, x):
        """The roots of the nodes ``x``, halving their paths on the way."""
        p = tl.load(parent_ptr + x, volatile=True)
        while tl.max((p != x).to(tl.int32), 0) > 0:
            up = p != x
            gp = tl.load(parent_ptr + p, volatile=True)
            tl.store(parent_ptr + x, gp, mask=up)  # an ancestor: safe beside links
            x = tl.where(up, gp, x)
            p = tl.load(parent_ptr + x, volatile=True)
        return x

    # sizes not specialised: one compiled kernel for every part (a first part whose size
    # differs from the warm-up's in divisibility would otherwise compile beside the decoding)
    @triton.jit(do_not_specialize=["n_pairs"])
    def _link_kernel(u_ptr, v_ptr, parent_ptr, n_pairs, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_pairs
        a = tl.load(u_ptr + offs, mask=live, other=0)
        b = tl.load(v_ptr + offs, mask=live, other=0)
        ra = _roots(parent_ptr, a)
        rb = _roots(parent_ptr, b)
        todo = ra != rb
        while tl.max(todo.to(tl.int32), 0) > 0:
            # lanes with nothing to do swap a node's own parent for itself: no effect
            hi = tl.where(todo, tl.maximum(ra, rb), a)
            lo = tl.where(todo, tl.minimum(ra, rb), a)
            old = tl.atomic_cas(parent_ptr + hi, hi, lo)
            todo = todo & (old != hi)
            ra = _roots(parent_ptr, tl.where(todo, ra, 0))
            rb = _roots(parent_ptr, tl.where(todo, rb, 0))
            todo = todo & (ra != rb)

    @triton.jit(do_not_specialize=["n"])
    def _label_kernel(parent_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        r = _roots(parent_ptr, tl.where(live, offs, 0))
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=live)


def component_roots(n: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Smallest node index of each node's component (int64 [n]) for the undirected pairs
    ``u``/``v`` (integer tensors on one CUDA device, or any device under the Triton
    interpreter); ``n`` < 2³¹."""
    if n >= 2**31:
        raise ValueError("component_roots: at most 2^31 - 1 nodes")
    dev = u.device
    parent = torch.arange(n, dtype=torch.int32, device=dev)
    out = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return out
    e = u.numel()
    if e:
        u32 = u.to(torch.int32).contiguous()
        v32 = v.to(torch.int32).contiguous()
        _link_kernel[(triton.cdiv(e, BLOCK),)](u32, v32, parent, e, BLOCK=BLOCK, num_warps=4)
    _label_kernel[(triton.cdiv(n, BLOCK),)](parent, out, n, BLOCK=BLOCK, num_warps=4)
    return out
