"""How much bfloat16 Gram products (outputs rounded per partial, as a CPU computes them) change the least-squares
refit, on SmolLM2's real MLP activations (issue 25).

    python eval/gram_precision.py --layers 0,5,15,29 --rows 4096

The dense model runs over the 128 × 512 C4 calibration windows under bfloat16 autocast; for each chosen layer the
rms-weighted activations x = √w·h feed two Grams: float64 products (the reference G) and bfloat16 products whose
outputs are rounded once per `--rows` tokens, summed in float64 (G̃, what `stats.moments.gram_` does on a CPU).
Printed per layer: ‖G̃ − G‖/‖G‖, the largest relative error of a diagonal entry, the extreme eigenvalues, and —
keeping the top 80 / 70 / 50 % of neurons by Wanda-sp's score — the refit's true output error tr(D G Dᵀ)
(D = W − W' scattered to full width) when W' is solved from G and from G̃.
"""
from __future__ import annotations

import argparse

import torch

from neuroproj_prune.model import load_model
from neuroproj_prune.prune.fold import chol_solve
from neuroproj_prune.prune.measure import rms_token_weights
from neuroproj_prune.stats import calibration_ids, hooked


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="c4-train-sample-1000.jsonl")
    ap.add_argument("--layers", default="0,5,15,29")
    ap.add_argument("--rows", type=int, default=4096, help="tokens per rounded bfloat16 partial Gram")
    a = ap.parse_args()
    lm = load_model(a.model, device="cpu")
    m, ad = lm.model, lm.adapter
    ids, _ = calibration_ids(lm, a.data, 128, 512, 0)
    layers = [int(x) for x in a.layers.split(",")]
    N = {i: ad.width(m, i) for i in layers}
    ref = {i: torch.zeros(N[i], N[i], dtype=torch.float64) for i in layers}
    low = {i: torch.zeros(N[i], N[i], dtype=torch.float64) for i in layers}
    got = {}
    points = [(("h", i), ad.out_proj(m, i), "in") for i in layers] + [(("o", i), ad.layers(m)[i], "out") for i in layers]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), hooked(points, got.__setitem__):
        for b in range(0, ids.shape[0], 8):
            m(input_ids=ids[b:b + 8], use_cache=False)
            with torch.autocast("cpu", enabled=False):
                for i in layers:
                    o = got["o", i]
                    w = rms_token_weights(o.reshape(-1, o.shape[-1]).float()).unsqueeze(1)
                    x = got["h", i].reshape(-1, N[i]).float() * (w / w.mean()).sqrt()
                    ref[i] += x.double().T @ x.double()
                    xb = x.bfloat16()
                    for r in range(0, xb.shape[0], a.rows):
                        low[i] += (xb[r:r + a.rows].T @ xb[r:r + a.rows]).double()
    for i in layers:
        G, Gl = ref[i], low[i]
        W = ad.out_weight(m, i).detach().double()
        ev, evl = torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(Gl)
        print(f"layer {i}: |G~-G|/|G| {(Gl - G).norm() / G.norm():.2e}, largest diagonal error "
              f"{((Gl - G).diagonal() / G.diagonal().clamp(min=1e-30)).abs().max():.2e}, eigenvalues "
              f"{ev[0]:.3e}..{ev[-1]:.3e} (G~: {evl[0]:.3e}..{evl[-1]:.3e})")
        score = G.diagonal() * W.pow(2).sum(0)
        for frac in (0.8, 0.7, 0.5):
            keep = torch.argsort(score, descending=True)[: int(N[i] * frac)]

            def error(A):
                D = -W.clone()
                D[:, keep] += chol_solve(A[keep][:, keep], W @ A[:, keep], 1e-7)
                return float(torch.trace(D @ G @ D.T))
            e, el = error(G), error(Gl)
            print(f"  keep {frac:.0%}: refit error from G {e:.6e}, from G~ {el:.6e}, relative change {(el - e) / e:+.2e}")


if __name__ == "__main__":
    main()
