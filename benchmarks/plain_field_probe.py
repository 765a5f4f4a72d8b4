"""How the plain N(0, 0.02²) init's decoder field looks for several weight seeds.

With the plain init the geometry decoder attends almost uniformly, so its logit field is a
constant offset (set by the weight draw) plus small noise.  The official baseline's draw had
an offset of about 0.1 (every vertex refined: dense decoding, foam surfaces); other draws put
the whole field above the iso-level (no sign change: nothing to mesh).  This probe writes the
shape VAE for each seed (drawn with the device's generator, as ``turbopart weights random``
and ``turbopart bench`` do), decodes N(0, 1) latents (a plain-init DiT returns latents close
to its input noise) on the 129³ coarse grid and prints, per seed: the field's mean, spread,
range and the fraction of coarse vertices the official rule refines.

    python benchmarks/plain_field_probe.py [--seeds 0 1 2 ...] [--parts 4] [--device cuda]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turbopart import weights as W  # noqa: E402
from turbopart.xpart import decoding  # noqa: E402


def probe(seed: int, parts: int, dev: torch.device, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="plain-probe-") as d:  # 0.65 GB per seed
        W.write_random(d, init="plain", seed=seed, components=["shapevae"], device=dev,
                       tiny=tiny)
        vae = W.load_component(d, "shapevae", device=dev, numerics="fast").prepare("fast")
    g = torch.Generator(device=dev).manual_seed(1234)
    lat = torch.randn(parts, vae.num_latents, vae.embed_dim, generator=g, device=dev)
    r0 = 32 if tiny else 128
    pts = decoding.dense_grid_points(r0, fp16=True, device=dev)[None]
    rows = []
    with torch.no_grad():
        for i in range(parts):
            kv = vae.geo_decoder.precompute_kv(vae.decode(lat[i:i + 1] / vae.scale_factor))
            grid = torch.cat([vae.geo_decoder.query(c, kv).float().reshape(-1)
                              for c in pts.split(1 << 20, dim=1)])
            grid = grid.reshape(1, r0 + 1, r0 + 1, r0 + 1).half()
            mark = decoding.near_surface_mark(grid, 2 * r0)
            gf = grid.float()
            rows.append({"mean": float(gf.mean()), "std": float(gf.std()),
                         "min": float(gf.min()), "max": float(gf.max()),
                         "refined": float(mark.float().mean())})
    return {"seed": seed, "parts": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args()
    dev = torch.device(a.device)
    res = []
    print(f"{'seed':>4} {'mean':>7} {'std':>6} {'min':>7} {'max':>7} {'refined':>8}  (per part)")
    for s in a.seeds:
        r = probe(s, a.parts, dev, a.tiny)
        res.append(r)
        for q in r["parts"]:
            print(f"{s:>4} {q['mean']:7.3f} {q['std']:6.3f} {q['min']:7.3f} {q['max']:7.3f} "
                  f"{100 * q['refined']:7.1f}%", flush=True)
    if a.out:
        from turbopart.runtime.profiling import environment
        Path(a.out).write_text(json.dumps({
            "benchmark": "plain-init decoder field per weight seed", "environment": environment(),
            "settings": {"device": str(dev), "seeds": a.seeds, "parts": a.parts,
                         "tiny": a.tiny, "coarse_grid": 32 if a.tiny else 128},
            "rows": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
