"""FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
arXiv 2405.03003), in PEFT's form so files move both ways (peft_type "FOURIERFT").

ΔW is learnt in the frequency domain: n spectral coefficients c at n fixed random frequencies
(rows u_k, columns v_k) of a d_out x d_in spectrum F, the rest of F zero, and
    ΔW = α · Re(IDFT2(F)),   IDFT2(F)[p, q] = 1/(d_out d_in) Σ_k c_k exp(2πi (u_k p / d_out + v_k q / d_in)),
    y = W x + ΔW x.
The frequencies are drawn as PEFT draws them, so they are never saved: the first n entries of
`torch.randperm(d_out · d_in)` under `torch.Generator().manual_seed(random_loc_seed)`, entry e giving
(u, v) = (e // d_in, e % d_in); every layer of one shape shares them. c ~ N(0, 1) (PEFT's default,
`init_weights=False`), or zeros with init="zeros". Mergeable. Trainable parameters: n per layer.

Options: n_frequency (n, default 1000), scaling (α, default 150.0), random_loc_seed (default 777).
`r` and `alpha` are not used (PEFT's `n_frequency_pattern`, per-layer n, is not supported).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options, positive_float


def spectral_indices(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) rows and columns of the n trained frequencies, as PEFT draws them."""
    entries = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([entries // d_in, entries % d_in])


@register
class FourierFTAdapter(Adapter):
    """FourierFT: ΔW = α·Re(IDFT2(F)), F zero but for n trainable coefficients at fixed random frequencies."""

    method = "fourierft"
    paper = ("Gao, Wang, Chen, Yang, Liu, Tang, Lin, Gao, Zhang 2024, Parameter-Efficient Fine-Tuning with "
             "Discrete Fourier Transform (arXiv 2405.03003)")
    serving_form = "merged only"
    peft_type = "FOURIERFT"
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        init = check_init(config, ("kaiming", "gaussian", "zeros", "random"))
        self.d_out, self.d_in = spec.out_features, spec.in_features
        self.n, self.scaling = o["n_frequency"], o["scaling"]
        if self.n > self.d_out * self.d_in:
            raise ValueError(f"option n_frequency={self.n} exceeds d_out·d_in={self.d_out * self.d_in} of this layer")
        device = spec.base.weight.device
        self.register_buffer("indices", spectral_indices(self.d_out, self.d_in, self.n, o["random_loc_seed"])
                             .to(device), persistent=False)
        spectrum = torch.zeros(self.n) if init == "zeros" else torch.randn(self.n)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.fourierft_spectrum = nn.Parameter(spectrum.to(device=device, dtype=config.torch_dtype))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        for key in ("n_frequency", "random_loc_seed"):
            if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < (1 if key == "n_frequency" else 0):
                raise ValueError(f"option {key} must be a {'positive' if key == 'n_frequency' else 'non-negative'} "
                                 f"integer, got {o[key]!r}")
        o["scaling"] = positive_float(o["scaling"], "scaling")
        return o

    # --- the math ---
    def delta_weight(self, spec: LayerSpec | None = None) -> torch.Tensor:
        """α · Re(IDFT2(F)) in float32 (the FFT has no half-precision kernels on most devices)."""
        spectrum = torch.zeros(self.d_out, self.d_in, device=self.fourierft_spectrum.device)
        spectrum = spectrum.index_put((self.indices[0], self.indices[1]), self.fourierft_spectrum.float())
        return torch.fft.ifft2(spectrum).real * self.scaling

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        update = self.delta_weight().to(self.fourierft_spectrum.dtype)
        x = x.to(update.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return (x @ update.t()).to(base_out.dtype)

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        return {"n_frequency": o["n_frequency"], "scaling": o["scaling"], "random_loc_seed": o["random_loc_seed"],
                "n_frequency_pattern": {}, "init_weights": config.init == "zeros", "fan_in_fan_out": False,
                "bias": "fourier_only" if config.bias == "lora_only" else config.bias, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        for key in ("layers_to_transform", "layers_pattern", "n_frequency_pattern"):
            if data.get(key) not in (None, [], {}, ""):
                raise ValueError(f"PEFT FourierFT option {key}={data[key]!r} is not supported by loraplex")
        options = {"n_frequency": int(data.get("n_frequency", 1000)), "scaling": float(data.get("scaling", 150.0)),
                   "random_loc_seed": int(data.get("random_loc_seed") if data.get("random_loc_seed") is not None
                                          else 777)}
        return {"targets": data["target_modules"], "exclude": data.get("exclude_modules"),
                "modules_to_save": data.get("modules_to_save") or [],
                "bias": "lora_only" if str(data.get("bias", "none")).endswith("_only") else data.get("bias", "none"),
                "init": "zeros" if data.get("init_weights") else "random", "options": options}

    def extra_repr(self) -> str:
        return f"n_frequency={self.n}, scaling={self.scaling}"
