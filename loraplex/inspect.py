"""What is inside an adapter folder: method, ranks, per-layer norms and singular values of ΔW."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraplex.core.io import read_adapter_files


def low_rank_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of B A without forming it: B = Q_b R_b, Aᵀ = Q_a R_a, so σ(BA) = σ(R_b R_aᵀ)."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().t())
    return torch.linalg.svdvals(rb @ ra.t())


def inspect_adapter(path: str | Path, top_k: int = 4) -> dict[str, Any]:
    config, tensors, folder = read_adapter_files(path)
    layers = []
    for key in sorted(tensors):
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                layer = key[: -len(a_suffix)]
                a, b = tensors[key].flatten(1), tensors[layer + b_suffix].flatten(1)
                r, alpha = a.shape[0], config.rank_and_alpha(layer)[1]
                s = config.scale(r, alpha)
                sv = low_rank_singular_values(b, a) * s
                layers.append({"path": layer, "shape": f"{b.shape[0]}x{a.shape[1]}", "r": r,
                               "delta_norm": float(sv.norm()), "singular_values": [float(v) for v in sv[:top_k]],
                               "all_singular_values": [float(v) for v in sv]})
    return {"path": str(folder), "method": config.method, "r": config.r, "alpha": config.alpha,
            "scale": config.scale(config.r, config.alpha), "dora": config.dora, "rslora": config.rslora,
            "targets": config.targets, "parameters": sum(t.numel() for t in tensors.values()), "layers": layers}


def plot_spectra(info: dict[str, Any], png: str | Path) -> None:
    """One line per layer: its singular values of s·B A, largest first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    cmap = plt.get_cmap("viridis")
    n = max(1, len(info["layers"]) - 1)
    for i, row in enumerate(info["layers"]):
        ax1.plot(range(1, len(row["all_singular_values"]) + 1), row["all_singular_values"], color=cmap(i / n),
                 lw=0.8, alpha=0.7)
    ax1.set_yscale("log")
    ax1.set_xlabel("index")
    ax1.set_ylabel("singular value of ΔW")
    ax1.set_title("spectra (colour: layer order)")
    ax2.bar(range(len(info["layers"])), [r["delta_norm"] for r in info["layers"]], color="tab:blue")
    ax2.set_xlabel("layer (sorted by name)")
    ax2.set_ylabel("‖ΔW‖_F")
    ax2.set_title("per-layer update norm")
    fig.suptitle(f"{Path(info['path']).name}: {info['method']} r={info['r']}")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
