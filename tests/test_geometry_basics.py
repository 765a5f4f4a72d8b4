import numpy as np
from conftest import needs_gpu
import torch

from turbopart.geometry.components import connected_components
from turbopart.geometry.fps import farthest_point_sampling


def _naive_fps(p, n, start, ties, init):
    p = p.astype(np.float32)
    dist = np.full(len(p), init, dtype=np.float32)
    out, cur = [], start
    for i in range(n):
        out.append(cur)
        d = ((p - p[cur]) ** 2).sum(-1, dtype=np.float32)
        dist = np.minimum(dist, d)
        m = dist.max()
        idx = np.nonzero(dist == m)[0]
        cur = int(idx[-1] if ties == "last" else idx[0])
    return np.array(out)


def test_fps_matches_naive_with_ties():
    rng = np.random.default_rng(0)
    # A grid has many exactly equal distances: exercises the tie rules.
    g = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = np.concatenate([g, rng.random((50, 3)) * 5]).astype(np.float32)
    for ties, init in (("last", np.inf), ("first", 5e4)):
        ours = farthest_point_sampling(torch.from_numpy(pts), 40, 7, ties=ties, init_dist=init)
        assert ours.tolist() == _naive_fps(pts, 40, 7, ties, init).tolist()


def test_fps_batched_starts():
    pts = torch.rand(3, 200, 3)
    out = farthest_point_sampling(pts, 10, torch.tensor([0, 5, 9]))
    assert out.shape == (3, 10)
    assert out[:, 0].tolist() == [0, 5, 9]
    for b in range(3):
        assert len(set(out[b].tolist())) == 10
        ref = _naive_fps(pts[b].numpy(), 10, int(out[b, 0]), "first", np.inf)
        assert out[b].tolist() == ref.tolist()


def test_components_ordered_by_smallest_node():
    # nodes 0..6: {0, 4}, {1, 2, 6}, {3}, {5}
    lab = connected_components(7, [4, 2, 6], [0, 1, 2])
    assert lab.tolist() == [0, 1, 1, 2, 0, 3, 1]


@needs_gpu
def test_fps_triton_matches_torch_loop():
    from turbopart.geometry import fps as fps_mod
    from turbopart.geometry.fps_triton import fps_triton
    g = torch.Generator().manual_seed(0)
    for b, n, k in ((1, 5000, 64), (16, 81920, 512), (3, 20000, 400)):
        pts = torch.rand(b, n, 3, generator=g).cuda()
        pts[:, : n // 4] = torch.round(pts[:, : n // 4] * 8) / 8  # exact ties
        start = torch.randint(0, n, (b,), generator=g).cuda()
        for ties, init in (("first", 5e4), ("last", float("inf"))):
            fps_mod.USE_TRITON = False
            ref = farthest_point_sampling(pts, k, start, ties=ties, init_dist=init)
            fps_mod.USE_TRITON = True
            for resident in (True, False):  # slices in registers / streamed from L2
                ours = fps_triton(pts, k, start, ties=ties, init_dist=init, resident=resident)
                assert torch.equal(ours, ref), (b, n, k, ties, resident)
