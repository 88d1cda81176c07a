"""One SAE object for every on-disk format: weights, config, and the encode of each architecture.

The encode math matches SAELens (``sae_lens/saes/*_sae.py``) in fp32, because a ranking is only
as good as the codes: the same input must give the codes the SAE was trained to produce.
Loaders (one module per format) build an :class:`SAE`; nothing here knows about files.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ingest.errors import SAEError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
# W_enc up to this many elements (1 GiB in fp32) gets a second, oneDNN-packed copy for the CPU encode
PACK_MAX_ELEMENTS = 1 << 28
RESTRICTED_KEPT = 8  # restrict sets whose W_enc columns stay sliced
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEConfig:
    """The part of an SAE's config that changes its encode (SAELens names)."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    hook_name: str = ""
    layer: int = 0
    stream: str = "resid_pre"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    prepend_bos: bool = True
    center_writing_weights: bool = False
    scaling_factor: float | None = None
    model_name: str = ""
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError("sae_id", f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError("sae_id", f"normalize_activations: expected one of {', '.join(NORMALIZATIONS)}, "
                           f"got {self.normalize_activations!r}")
        if self.architecture == "topk" and not self.k:
            raise SAEError("sae_id", "k: a topk SAE needs a positive k in its config")


@dataclass
class SAE:
    """Weights in SAELens orientation: W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""

    cfg: SAEConfig
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None  # jumprelu
    b_gate: torch.Tensor | None = None  # gated
    b_mag: torch.Tensor | None = None
    r_mag: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.cfg.check()
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        shapes = {"W_enc": (self.W_enc, (d_in, d_sae)), "b_enc": (self.b_enc, (d_sae,)),
                  "W_dec": (self.W_dec, (d_sae, d_in)), "b_dec": (self.b_dec, (d_in,))}
        if self.cfg.architecture == "jumprelu":
            shapes["threshold"] = (self.threshold, (d_sae,))
        for name, (tensor, shape) in shapes.items():
            if tensor is None or tuple(tensor.shape) != shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise SAEError("sae_id", f"weight {name}: expected shape {shape} from cfg d_in={d_in}, d_sae={d_sae}; got {got}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach().to(torch.float32).contiguous())
                self._check_finite(name)
        # the encoder columns of the last few restrict sets (a long-running server sees many)
        self._restricted: OrderedDict[tuple[int, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self._packed: torch.Tensor | bool | None = False  # False: not tried yet; None: not available

    def _check_finite(self, name: str) -> None:
        """Refuse a weight holding NaN or ±inf (checked after the fp32 cast, which can overflow fp64
        weights): its codes would be NaN/inf, stored as activations, and poison every score."""
        tensor = getattr(self, name)
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SAEError("sae_id", f"{self.source or 'the SAE'}: tensor {name} holds NaN/inf "
                           f"({bad} of {tensor.numel()} values); refusing SAE weights that are not finite")

    @property
    def fingerprint(self) -> str:
        """A short hash of config and weights: part of the run identity (a retrained SAE is a new SAE)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(repr(sorted(vars(self.cfg).items())).encode())
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
                value = getattr(self, name)
                if value is not None:
                    h.update(name.encode())
                    h.update(value.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def to(self, device: torch.device | str) -> SAE:
        """Move the weights; on the device they are already on this keeps the cached restricted slices
        and packed encoder (the service calls it for every micro-batch)."""
        if self.W_enc.device == torch.device(device):
            return self
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self._restricted.clear()
        self._packed = False
        return self

    # -- encode -----------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens ``process_sae_in``: optional centring, normalisation, then ``- b_dec``."""
        x = x.to(torch.float32)
        if self.cfg.center_writing_weights:
            x = x - x.mean(dim=-1, keepdim=True)
        norm = self.cfg.normalize_activations
        if norm == "expected_average_only_in":
            if self.cfg.scaling_factor is None:
                raise SAEError("sae_id", "scaling_factor: normalize_activations=expected_average_only_in needs it")
            x = x * self.cfg.scaling_factor
        elif norm == "constant_norm_rescale":
            x = x * ((self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True))
        elif norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def _weights(self, features: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
        """Encoder weights, sliced to ``features`` once and kept (restrict costs a few columns)."""
        names = ("W_enc", "b_enc", "threshold", "b_gate", "b_mag", "r_mag")
        if features is None:
            return tuple(getattr(self, n) for n in names)
        if features not in self._restricted:
            idx = torch.tensor(features, dtype=torch.long, device=self.W_enc.device)
            self._restricted[features] = tuple(
                None if getattr(self, n) is None else (self.W_enc[:, idx] if n == "W_enc" else getattr(self, n)[idx])
                for n in names)
            while len(self._restricted) > RESTRICTED_KEPT:
                self._restricted.popitem(last=False)
        self._restricted.move_to_end(features)
        return self._restricted[features]

    def encode(self, x: torch.Tensor, features: tuple[int, ...] | None = None) -> torch.Tensor:
        """Codes [n, d_sae] (or [n, len(features)] with ``features``) for activations x [n, d_in].

        A TopK SAE needs the whole pre-activation (a feature's value depends on the others), so
        ``features`` only selects columns after the full encode there.
        """
        sae_in = self.preprocess(x)
        arch = self.cfg.architecture
        if arch == "topk":
            acts = self._encode_topk(sae_in)
            if features is not None:
                acts = acts[:, torch.tensor(features, dtype=torch.long, device=acts.device)]
            return acts
        W_enc, b_enc, threshold, b_gate, b_mag, r_mag = self._weights(features)
        if arch == "gated":
            pre = sae_in @ W_enc
            active = (pre + b_gate) > 0
            magnitude = torch.relu(pre * torch.exp(r_mag) + b_mag)
            return active.to(magnitude.dtype) * magnitude
        # one fused GEMM + bias + ReLU, then in place: the [n, d_sae] block is the hot path's only big tensor
        acts = self._linear(sae_in, W_enc, b_enc, relu=True, whole=features is None)
        if arch == "jumprelu":  # relu(pre) * (pre > threshold) == relu(pre) zeroed where relu(pre) <= threshold
            return acts.masked_fill_(acts <= threshold, 0.0)
        return acts

    def _linear(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, relu: bool, whole: bool
                ) -> torch.Tensor:
        """``x @ W_enc + b_enc`` (ReLU'd when asked). For the whole encoder on CPU, oneDNN's linear with
        W_enc packed once for it and the ReLU fused: the packed layout is reused across calls instead of
        re-laid out by every addmm, and the ReLU needs no second pass over the [n, d_sae] block (same fp32
        products, summed in another order, so codes agree to float rounding)."""
        packed = self._packed_encoder() if whole and x.device.type == "cpu" else None
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b_enc, "relu" if relu else "none", [], "")
        out = torch.addmm(b_enc, x, W_enc)
        return out.relu_() if relu else out

    def _packed_encoder(self) -> torch.Tensor | None:
        """W_enc in oneDNN's blocked layout (a second copy, so only up to PACK_MAX_ELEMENTS), or None
        where this torch build or device has no oneDNN linear."""
        if self._packed is False:
            self._packed = None
            if (self.W_enc.device.type == "cpu" and self.W_enc.numel() <= PACK_MAX_ELEMENTS
                    and torch.backends.mkldnn.is_available()):
                try:
                    packed = torch.ops.mkldnn._reorder_linear_weight(self.W_enc.T.contiguous(), batch_size=512)
                    probe = torch.zeros((1, self.cfg.d_in))
                    torch.ops.mkldnn._linear_pointwise(probe, packed, self.b_enc, "none", [], "")
                    self._packed = packed
                except (AttributeError, RuntimeError, NotImplementedError):
                    self._packed = None
        return self._packed  # type: ignore[return-value]

    def _encode_topk(self, sae_in: torch.Tensor) -> torch.Tensor:
        hidden_pre = self._linear(sae_in, self.W_enc, self.b_enc, relu=False, whole=True)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        k = min(int(self.cfg.k or 0), hidden_pre.shape[-1])
        top = torch.topk(hidden_pre, k, dim=-1, sorted=False)
        out = torch.zeros_like(hidden_pre)
        return out.scatter_(-1, top.indices, torch.relu(top.values))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the SAE's input space (before any de-normalisation)."""
        return codes @ self.W_dec + self.b_dec

    # -- decode in model space (attribution and ablation) ------------------------------------------
    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token factor [n] of SAELens' de-normalisation (``run_time_activation_norm_fn_out``) for
        activations x [n, d_in], with x's statistics held fixed: 1/scaling_factor for
        expected_average_only_in (SAELens folds it into W_dec and b_dec), the input norm / √d_in for
        constant_norm_rescale, the input std for layer_norm (SAELens multiplies by std, not std + eps)."""
        x = x.to(torch.float32) if x.dtype != torch.float64 else x
        if self.cfg.center_writing_weights:
            x = x - x.mean(dim=-1, keepdim=True)
        norm = self.cfg.normalize_activations
        ones = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        if norm == "expected_average_only_in":
            return ones / float(self.cfg.scaling_factor)
        if norm == "constant_norm_rescale":
            return x.norm(dim=-1) / (self.cfg.d_in ** 0.5)
        if norm == "layer_norm":
            return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1)
        return ones

    def decoder_rows(self, features: torch.Tensor) -> torch.Tensor:
        """∂(SAE-space reconstruction)/∂code_f for feature ids [m]: W_dec[f], divided by ‖W_dec[f]‖ where
        a TopK SAE rescales its codes by the decoder norm (SAELens' decode divides them back)."""
        rows = self.W_dec[features]
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            rows = rows / rows.norm(dim=-1, keepdim=True)
        return rows

    def decode_model(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction in model space [n, d_in] (SAELens' ``decode``, de-normalised with x's
        statistics): affine in the codes, so ``∂x/∂code_f = output_scale(x) · decoder_rows(f)``."""
        all_rows = self.decoder_rows(torch.arange(self.cfg.d_sae, device=self.W_dec.device)).to(codes.dtype)
        out = codes @ all_rows + self.b_dec.to(codes.dtype)
        x = x.to(codes.dtype)
        norm = self.cfg.normalize_activations
        if norm == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True) if self.cfg.center_writing_weights else x
            return out * self.output_scale(x)[:, None].to(codes.dtype) + centred.mean(dim=-1, keepdim=True)
        return out * self.output_scale(x)[:, None].to(codes.dtype)


def numpy_weights(sae: SAE) -> dict[str, np.ndarray]:
    """The weights as numpy arrays, for writers and oracles."""
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag")
    return {n: getattr(sae, n).cpu().numpy() for n in names if getattr(sae, n) is not None}
