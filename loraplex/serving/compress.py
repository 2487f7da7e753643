"""Compress then Serve (Brüel-Gabrielsson et al., 2024, arXiv 2407.00066): many LoRAs, one shared basis.

On every adapted layer, the n adapters' updates ΔW_i = s_i B_i A_i (d_out x d_in) are replaced by

    ΔW_i ≈ U Σ_i Vᵀ,    U: d_out x R, V: d_in x R orthonormal and shared,  Σ_i = Uᵀ ΔW_i V: R x R per adapter

("JD-Full"). For fixed U, V the best Σ_i is that projection, so the fit maximises Σ_i ‖Uᵀ ΔW_i V‖²_F,
by alternating exact eigen steps (each step cannot lower the objective):

    U ← top-R eigenvectors of Σ_i w_i² ΔW_i V Vᵀ ΔW_iᵀ,     V ← top-R eigenvectors of Σ_i w_i² ΔW_iᵀ U Uᵀ ΔW_i

started from V = top-R eigenvectors of Σ_i w_i² ΔW_iᵀ ΔW_i. With `normalize`, w_i = 1/‖ΔW_i‖_F so a
large-norm adapter does not claim the whole basis (the paper's `normalize` transform); Σ_i is always
the exact projection of the unweighted ΔW_i. Nothing of size d_out x d_in is ever formed: all ΔW_i lie
in span(B) x span(Aᵀ), so the fit runs on the N x N "core" of QR factors (N = Σ r_i, when N < d).

Serving (`ServingModule`): y += ((x V) Σ_iᵀ) Uᵀ: two GEMMs over all the set's rows plus a batched
R x R product per row, whatever the number of distinct adapters in the batch. Per adapter and layer
only R² numbers are kept, so thousands of adapters stay resident (no paging).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, layer_kind
from loraplex.core.io import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFileError,
    atomic_write_files,
    tensors_to_bytes,
)
from loraplex.serving.adapters import HostAdapter

COMPRESSED_CONFIG = "compressed_config.json"
COMPRESSED_WEIGHTS = "compressed.safetensors"
FORMAT = "loraplex-compressed-lora"


@dataclass
class SharedBasis:
    """One layer of a compressed set. v: (d_in, R); u_t: Uᵀ (R, d_out); sigma_t: Σ_iᵀ stacked (n, R, R)
    (zeros for members that do not adapt this layer)."""

    v: torch.Tensor
    u_t: torch.Tensor
    sigma_t: torch.Tensor

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.u_t, self.sigma_t]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SharedBasis:
        return SharedBasis(*(t.to(device=device, dtype=dtype or t.dtype) for t in self.tensors()))

    def delta_rows(self, xs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """xs: (rows, tokens, d_in), row i served by member index[i] -> the low-rank delta (rows, tokens, d_out)."""
        h = xs @ self.v                                   # shrink into the shared basis: (rows, tokens, R)
        h = torch.bmm(h, self.sigma_t.index_select(0, index))   # each row's own R x R core
        return h @ self.u_t                               # expand from the shared basis


@dataclass
class CompressedSet:
    """Adapters compressed together: member names and, per layer, the shared basis and the cores."""

    adapters: list[str]
    layers: dict[str, SharedBasis]
    report: dict = field(default_factory=dict)
    name: str = "compressed"
    path: Path | None = None

    def index(self, adapter: str) -> int:
        return self.adapters.index(adapter)

    def tensors(self) -> list[torch.Tensor]:
        return [t for basis in self.layers.values() for t in basis.tensors()]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def delta_weight(self, adapter: str, layer: str) -> torch.Tensor:
        """U Σ_i Vᵀ of one member on one layer (d_out x d_in), for checks and exports."""
        b = self.layers[layer]
        return (b.v @ b.sigma_t[self.index(adapter)] @ b.u_t).t()

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = {}
        for path, b in self.layers.items():
            tensors[f"{path}.V"], tensors[f"{path}.U"] = b.v, b.u_t.t()
            tensors[f"{path}.sigma"] = b.sigma_t.transpose(1, 2)
        config = {"format": FORMAT, "version": 1, "method": "jd-full", "adapters": self.adapters,
                  "layers": {p: {"rank": b.rank, "in_features": b.v.shape[0], "out_features": b.u_t.shape[1]}
                             for p, b in self.layers.items()},
                  "report": self.report}
        atomic_write_files({folder / COMPRESSED_WEIGHTS: tensors_to_bytes(tensors),
                            folder / COMPRESSED_CONFIG: json.dumps(config, indent=2).encode()})

    def export_lora(self, adapter: str, folder: str | Path, base_model_name: str | None = None) -> None:
        """One member as a plain PEFT LoRA folder: A = Vᵀ, B = U Σ_i, alpha = r (scale 1)."""
        i = self.index(adapter)
        tensors, ranks = {}, {}
        for path, b in self.layers.items():
            if not bool(b.sigma_t[i].any()):
                continue          # the member does not adapt this layer
            tensors[f"{PREFIX}{path}.lora_A.weight"] = b.v.t()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = (b.sigma_t[i] @ b.u_t).t()
            ranks[path] = b.rank
        if not ranks:
            raise ValueError(f"adapter {adapter!r} adapts no layer of the compressed set")
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                  "target_modules": sorted(ranks), "r": r0, "lora_alpha": r0, "lora_dropout": 0.0, "bias": "none",
                  "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": pattern,
                  "alpha_pattern": dict(pattern), "fan_in_fan_out": False, "inference_mode": True}
        folder = Path(folder)
        atomic_write_files({folder / WEIGHTS_NAME: tensors_to_bytes(tensors),
                            folder / CONFIG_NAME: json.dumps(config, indent=2).encode()})


# --------------------------------------------------------------------------- the fit
@dataclass
class LayerFit:
    u: torch.Tensor          # (d_out, R), orthonormal columns
    v: torch.Tensor          # (d_in, R), orthonormal columns
    sigma: torch.Tensor      # (n, R, R): Σ_i = Uᵀ ΔW_i V, zeros where the adapter is absent
    energy: list[float]      # ‖ΔW_i‖²_F
    kept: list[float]        # ‖Σ_i‖²_F = ‖U Σ_i Vᵀ‖²_F  (‖ΔW_i - U Σ_i Vᵀ‖² = energy - kept)


def fit_shared_basis(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], rank: int, *, iters: int = 10,
                     tol: float = 1e-7, normalize: bool = True, dtype: torch.dtype = torch.float64,
                     exact_below: int = 256, power_steps: int = 3) -> LayerFit:
    """JD-Full on one layer. pairs[i] = (A_i: r_i x d_in, B_i: d_out x r_i) with ΔW_i = B_i A_i (scale folded
    into B), or None when adapter i does not adapt this layer. The basis rank is min(rank, N, d_in, d_out)."""
    present = [i for i, p in enumerate(pairs) if p is not None]
    if not present:
        raise ValueError("no adapter adapts this layer")
    if rank < 1:
        raise ValueError(f"the shared basis rank must be >= 1, got {rank}")
    a_all = torch.cat([pairs[i][0].to(dtype) for i in present], 0)        # N x d_in
    b_all = torch.cat([pairs[i][1].to(dtype) for i in present], 1)        # d_out x N
    n_total, d_in = a_all.shape
    d_out = b_all.shape[0]
    # Core coordinates: B = Q_b L, Aᵀ = Q_a Rt, so ΔW_i = Q_b (L_i Rt_iᵀ) Q_aᵀ with small L_i, Rt_i.
    q_b, core_b = torch.linalg.qr(b_all) if n_total < d_out else (None, b_all)
    q_a, core_a = torch.linalg.qr(a_all.t()) if n_total < d_in else (None, a_all.t())
    # adapters of one rank are stacked: L (n_g, k_out, r), Rt (n_g, k_in, r), so every step is a few bmm's
    groups: dict[int, list[int]] = {}
    offsets, at = {}, 0
    for i in present:
        r = pairs[i][0].shape[0]
        offsets[i], at = (at, at + r), at + r
        groups.setdefault(r, []).append(i)
    stacks = []
    for members in groups.values():
        lg = torch.stack([core_b[:, offsets[i][0]:offsets[i][1]] for i in members])
        rg = torch.stack([core_a[:, offsets[i][0]:offsets[i][1]] for i in members])
        energy = ((lg.transpose(1, 2) @ lg) * (rg.transpose(1, 2) @ rg)).sum((1, 2))    # ‖L_i Rt_iᵀ‖²_F
        ones = torch.ones_like(energy)
        w = torch.where(energy > 0, 1.0 / torch.where(energy > 0, energy, ones), ones) if normalize else ones
        # w_i² = 1/‖ΔW_i‖² (the normalised fit)
        stacks.append((members, lg, rg, energy, w))
    big_r = min(rank, core_b.shape[0], core_a.shape[0])

    gen = torch.Generator().manual_seed(0)

    def top(gram: torch.Tensor, warm: torch.Tensor | None = None) -> torch.Tensor:
        """The top eigenvectors of a PSD matrix, R of them plus up to 8 more (kept to warm-start the next
        call), largest first: full `eigh` when small; else block power iteration from the previous block
        (or a random one), then Rayleigh-Ritz (a full eigh of 1536² costs seconds, this milliseconds)."""
        k = gram.shape[0]
        width = min(k, big_r + 8)
        if k <= exact_below:
            _, vecs = torch.linalg.eigh(gram.double())                    # ascending eigenvalues
            return vecs[:, -width:].flip(1).to(dtype)
        q = warm if warm is not None else torch.randn(k, width, generator=gen, dtype=dtype)
        for _ in range(power_steps if warm is not None else 4 * power_steps):
            q = torch.linalg.qr(gram @ q).Q
        _, vecs = torch.linalg.eigh((q.t() @ gram @ q).double())
        return (q @ vecs.flip(1).to(dtype)).contiguous()

    def gram(side: int, basis: torch.Tensor) -> torch.Tensor:
        """side 0: Σ w_i² M_i basis basisᵀ M_iᵀ (k_out square); side 1: Σ w_i² M_iᵀ basis basisᵀ M_i."""
        total = 0
        for _, lg, rg, _, w in stacks:
            left, right = (lg, rg) if side == 0 else (rg, lg)
            c = right.transpose(1, 2) @ basis                                 # (n_g, r, R)
            n_g, k, r = left.shape
            if basis.shape[1] <= r:       # stack P_i = w_i L_i C_i: (k, n_g R), one GEMM P Pᵀ
                p = (w.sqrt()[:, None, None] * (left @ c)).transpose(0, 1).reshape(k, -1)
                total = total + p @ p.t()
            else:                         # rank-r form: [w_i² L_i C_i C_iᵀ] (k, N_g) times [L_i]ᵀ
                y = (w[:, None, None] * (left @ (c @ c.transpose(1, 2)))).transpose(0, 1).reshape(k, -1)
                total = total + y @ left.transpose(0, 1).reshape(k, -1).t()
        return total

    # start: the best V for an unconstrained U, the top of Σ w_i² M_iᵀ M_i = Σ w_i² Rt_i (L_iᵀ L_i) Rt_iᵀ
    init = 0
    for _, lg, rg, _, w in stacks:
        y = (w[:, None, None] * (rg @ (lg.transpose(1, 2) @ lg))).transpose(0, 1).reshape(rg.shape[1], -1)
        init = init + y @ rg.transpose(0, 1).reshape(rg.shape[1], -1).t()
    v_wide = top(init)
    v = v_wide[:, :big_r]
    u_wide = top(gram(0, v))
    u = u_wide[:, :big_r]

    def projections(u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [(u.t() @ lg) @ (rg.transpose(1, 2) @ v) for _, lg, rg, _, _ in stacks]   # Σ_i, (n_g, R, R)

    previous = -math.inf
    for _ in range(iters):
        v_wide = top(gram(1, u), v_wide)
        v = v_wide[:, :big_r]
        u_wide = top(gram(0, v), u_wide)
        u = u_wide[:, :big_r]
        captured = sum(float((s[4][:, None, None] * c.square()).sum()) for s, c in zip(stacks, projections(u, v)))
        if captured - previous <= tol * max(abs(captured), 1e-30):
            break
        previous = captured
    sigma = torch.zeros(len(pairs), big_r, big_r, dtype=dtype)
    full_energy = [0.0] * len(pairs)
    kept = [0.0] * len(pairs)
    for (members, _, _, energy, _), cores in zip(stacks, projections(u, v)):
        for j, i in enumerate(members):
            sigma[i] = cores[j]
            full_energy[i], kept[i] = float(energy[j]), float(cores[j].square().sum())
    u_full = u if q_b is None else q_b @ u
    v_full = v if q_a is None else q_a @ v
    return LayerFit(u_full, v_full, sigma, full_energy, kept)


def compress(adapters: list[HostAdapter], rank: int, *, iters: int = 10, normalize: bool = True,
             dtype: torch.dtype = torch.float64, out_dtype: torch.dtype = torch.float32,
             name: str = "compressed") -> CompressedSet:
    """Jointly compress read adapters (`read_adapter`) into one `CompressedSet` of basis rank <= `rank`."""
    if len(adapters) < 1:
        raise ValueError("give at least one adapter to compress")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be distinct, got {names}")
    for a in adapters:
        problem = ("it is a DoRA adapter (its magnitude rescales the base output)" if a.dora else
                   f"it has modules_to_save {sorted(a.saved)}" if a.saved else None)
        bad = [p for p, lw in a.layers.items() if lw.kind not in (LINEAR, GPT2_CONV1D)]
        if bad:
            problem = f"layer {bad[0]!r} is an embedding (only linear layers are compressed)"
        if problem:
            raise ValueError(f"adapter {a.name!r} cannot be compressed: {problem}; compress plain LoRA/rsLoRA "
                             "adapters on linear layers and serve the others as they are")
    paths = sorted({p for a in adapters for p in a.layers})
    layers: dict[str, SharedBasis] = {}
    energy = [0.0] * len(adapters)
    kept = [0.0] * len(adapters)
    original_bytes = sum(lw.a_t.numel() + lw.b_t.numel() for a in adapters for lw in a.layers.values())
    for path in paths:
        # LoraWeights hold Aᵀ (d_in x r) and (s B)ᵀ (r x d_out)
        pairs = [(a.layers[path].a_t.t(), a.layers[path].b_t.t()) if path in a.layers else None for a in adapters]
        fit = fit_shared_basis(pairs, rank, iters=iters, normalize=normalize, dtype=dtype)
        layers[path] = SharedBasis(fit.v.to(out_dtype).contiguous(), fit.u.t().to(out_dtype).contiguous(),
                                   fit.sigma.transpose(1, 2).to(out_dtype).contiguous())
        for i in range(len(adapters)):
            energy[i] += fit.energy[i]
            kept[i] += fit.kept[i]
    out = CompressedSet(names, layers, name=name)
    element = torch.tensor([], dtype=out_dtype).element_size()
    out.report = {
        "rank": rank, "layers": len(layers),
        "relative_error": {n: math.sqrt(max(e - k, 0.0) / e) if e > 0 else 0.0
                           for n, e, k in zip(names, energy, kept)},
        "original_bytes": original_bytes * element, "compressed_bytes": out.nbytes,
        "per_adapter_bytes": sum(b.sigma_t[0].numel() for b in layers.values()) * element,
        "shared_bytes": sum(b.v.numel() + b.u_t.numel() for b in layers.values()) * element,
    }
    return out


# --------------------------------------------------------------------------- reading
def is_compressed(path: str | Path) -> bool:
    return (Path(path) / COMPRESSED_CONFIG).exists()


def read_compressed(path: str | Path, modules: dict[str, nn.Module], dtype: torch.dtype,
                    name: str | None = None) -> CompressedSet:
    """Read a compressed set written by `CompressedSet.save` and check every layer against the base."""
    folder = Path(path)
    config_file, weights_file = folder / COMPRESSED_CONFIG, folder / COMPRESSED_WEIGHTS
    if not config_file.exists() or not weights_file.exists():
        raise AdapterFileError(f"{folder}: a compressed set holds {COMPRESSED_CONFIG} and {COMPRESSED_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{config_file}: not a loraplex compressed adapter set (format {FORMAT!r})")
    names = config.get("adapters")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(f"{config_file}: 'adapters' must be a non-empty list of names")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file ({err})") from None
    layers: dict[str, SharedBasis] = {}
    for path in config.get("layers") or {}:
        where = f"{weights_file}: layer {path!r}"
        try:
            v, u, sigma = tensors.pop(f"{path}.V"), tensors.pop(f"{path}.U"), tensors.pop(f"{path}.sigma")
        except KeyError:
            raise AdapterFileError(f"{where}: needs the .V, .U and .sigma tensors") from None
        module = modules.get(path)
        if module is None:
            raise AdapterFileError(f"{where}: the base model has no such module (made for another base model?)")
        kind = layer_kind(module)
        if kind not in (LINEAR, GPT2_CONV1D):
            raise AdapterFileError(f"{where}: a {type(module).__name__} layer cannot hold a compressed adapter")
        d_in, d_out = ((module.in_features, module.out_features) if kind == LINEAR
                       else tuple(module.weight.shape))
        r = v.shape[-1] if v.dim() == 2 else -1
        if (v.dim() != 2 or tuple(v.shape) != (d_in, r) or tuple(u.shape) != (d_out, r)
                or tuple(sigma.shape) != (len(names), r, r)):
            raise AdapterFileError(f"{where}: V {tuple(v.shape)}, U {tuple(u.shape)}, sigma {tuple(sigma.shape)} "
                                   f"do not fit the base layer ({d_in} -> {d_out}) and {len(names)} adapters "
                                   "(made for another base model?)")
        layers[path] = SharedBasis(v.to(dtype).contiguous(), u.t().to(dtype).contiguous(),
                                   sigma.transpose(1, 2).to(dtype).contiguous())
    if not layers:
        raise AdapterFileError(f"{config_file}: the set adapts no layer")
    if tensors:
        raise AdapterFileError(f"{weights_file}: unexpected tensor(s) {sorted(tensors)[:3]}")
    return CompressedSet(list(names), layers, config.get("report") or {}, name=name or folder.name, path=folder)
