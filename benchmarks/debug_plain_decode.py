"""Diagnose the plain-init (noise field) decode on the GPU: one part, octree 512, fast.

Prints: logit statistics (fused vs eager query path on a sample), query counts per level,
grid/mask statistics, marching-cubes faces, and the clean-up sizes after each step."""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turbopart import weights as W  # noqa: E402
from turbopart.geometry.cleanup import CleanupStats, official_cleanup  # noqa: E402
from turbopart.geometry.marching_cubes import grid_to_world, marching_cubes  # noqa: E402
from turbopart.runtime import memory  # noqa: E402
from turbopart.xpart import decoding  # noqa: E402

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
TINY = dev.type == "cpu"
RES = 128 if TINY else 512
d = W.write_random(tempfile.mkdtemp(), init="plain", components=["shapevae"], device=dev,
                   tiny=TINY)
vae = W.load_component(d, "shapevae", device=dev, numerics="fast").prepare("fast")
ballast = torch.empty(0 if TINY else int(7.5 * 2**30), dtype=torch.uint8, device=dev)  # models resident
g = torch.Generator(device=dev).manual_seed(0)
lat = torch.randn(1, vae.num_latents if hasattr(vae, 'num_latents') else 1024,
                  vae.post_kl.in_features, generator=g, device=dev)
kv = vae.geo_decoder.precompute_kv(vae.decode(lat / vae.scale_factor))
pts = (torch.rand(1, 200000, 3, generator=g, device=dev) * 2.02 - 1.01)
fused = vae.geo_decoder.query(pts, kv).float()
vae.geo_decoder.kernel = "eager"
eager = vae.geo_decoder.query(pts, kv).float()
vae.geo_decoder.kernel = "fused"
print("logits fused: mean %.4f std %.4f min %.4f max %.4f nan %d" % (
    fused.mean(), fused.std(), fused.min(), fused.max(), int(fused.isnan().sum())))
print("fused vs eager max|d| %.4g" % float((fused - eager).abs().max()))
t = time.time()
vol = next(decoding.iter_volumes(lambda p, parts: vae.geo_decoder.query(p, kv), [0], RES,
                                 device=dev, chunk=1 << 20, fine_dtype=torch.float32))
torch.cuda.synchronize() if dev.type == "cuda" else None
print("decode %.2f s queries %s" % (time.time() - t, vol.queries))
gg = vol.grid.float()
fin = gg[~gg.isnan()]
print("grid finite %d of %d; mean %.4f min %.4f max %.4f; above level %d; mask %s" % (
    fin.numel(), gg.numel(), fin.mean(), fin.min(), fin.max(),
    int((fin > decoding.MC_LEVEL).sum()), None if vol.mask is None else int(vol.mask.sum())))
t = time.time()
v, f = marching_cubes(vol.grid, decoding.MC_LEVEL, mask=vol.mask)
torch.cuda.synchronize() if dev.type == "cuda" else None
print("mc %.2f s verts %d faces %d nan verts %d budget %.2f GB" % (
    time.time() - t, v.shape[0], f.shape[0], int(v.isnan().any(1).sum()),
    memory.budget_bytes(dev) / 2**30))
st = CleanupStats()
vw = grid_to_world(v, RES, decoding.BOUNDS)
v2, f2 = official_cleanup(vw, f, reverse=True, max_edge=8 / 512, ratio=0.005, stats=st)
print("cleanup faces %d stats %s" % (f2.shape[0], st))
del ballast

# --- the DiT's first call (the failing plain run had no warm-up call): same inputs twice
if not TINY:
    from turbopart.xpart.dit import draw_part_index
    from turbopart.xpart.dit_runner import DiTRunner
    W.write_random(d, init="plain", components=["model"], device=dev)
    model = W.load_component(d, "model", device=dev, numerics="fast").prepare("fast")
    k = 8
    x = torch.randn(k, 1024, 64, generator=g, device=dev)
    obj = torch.randn(k, 4096, 1024, generator=g, device=dev)
    geo = torch.randn(k, 4096, 1024, generator=g, device=dev)
    idx = draw_part_index(k, model.valid_num, torch.Generator().manual_seed(0))
    runner = DiTRunner(model, obj, geo)
    first = runner(x, 0.37, idx).float()
    second = runner(x, 0.37, idx).float()
    eager = DiTRunner(model, obj, geo, cuda_graph=False)(x, 0.37, idx).float()
    print("DiT first call finite %s, first vs second max|d| %.3g, graph vs eager rel %.3g" % (
        bool(first.isfinite().all()), float((first - second).abs().max()),
        float((second - eager).norm() / eager.norm())))
