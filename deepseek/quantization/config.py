"""QuantConfig: what to quantize and how; validated, and round-trips through JSON."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields

from deepseek.errors import DeepseekError
from deepseek.quantization.observers import CALIBRATORS

METHODS = ("asymmetric", "symmetric")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
CALIBRATIONS = (*CALIBRATORS, "dynamic")  # "dynamic": ranges taken from each call's rows


class QuantizationError(DeepseekError):
    """A quantization config, model or calibration input that cannot be used as given."""


@dataclass
class QuantConfig:
    """How a model is quantized.

    ``method`` applies to weights and activations (activations: "asymmetric" is
    uint8 with a zero point, "symmetric" int8 with zero point 0). Weights are
    quantized ``per_tensor``, ``per_channel`` (output channel) or ``per_group``
    (``group_size`` consecutive input features of one output channel; for
    weight-only quantization of LLM-style linears). Activations are per tensor,
    calibrated by ``calibration`` ("minmax", "percentile", "entropy", "mse").
    ``activation_bits=None`` (or quantizing without calibration data) gives
    weight-only quantization. ``calibration="dynamic"`` needs no calibration data:
    each row (token) of a Linear layer's input is quantized to 8 bits with a scale
    (and, "asymmetric", a zero point) taken from that row at run time, as
    ``torch.ao.quantization.quantize_dynamic`` and ONNX Runtime's ``quantize_dynamic``
    do (they take one range per tensor); convolutions stay in float. ``skip`` holds
    module-name patterns (fnmatch: ``"classifier.*"``, ``"*.attention.*"``) left in
    float. ``accuracy_budget`` (the largest drop of the eval metric accepted) turns on
    mixed precision: the most sensitive layers stay in float until the budget holds.

    Example::

        QuantConfig(weight_bits=4, activation_bits=None, granularity="per_group", group_size=64)
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    method: str = "asymmetric"
    granularity: str = "per_channel"
    group_size: int = 128
    calibration: str = "minmax"
    skip: list[str] = field(default_factory=list)
    accuracy_budget: float | None = None
    percentile: float = 99.99  # for calibration="percentile"
    weight_search: str = "minmax"  # "minmax" | "mse": clip weight ranges to the least error
    fold_batch_norm: bool = True  # fold BatchNorm into the convolution before it first
    # weights only: "symmetric" | "asymmetric"; None follows ``method``. oneDNN's int8 kernels
    # take no weight zero point (asymmetric weights cost a correction after the GEMM), so
    # method="asymmetric", weight_method="symmetric" is the fastest CPU scheme
    weight_method: str | None = None
    progress: bool = True  # a progress bar over calibration batches (on a terminal)
    # nn.Embedding tables too: weight-only, one scale per row (per_tensor: one for all);
    # the compiled lookup gathers int8 rows and dequantizes just those
    embeddings: bool = False
    # static PTQ: shift each quantized layer's bias by the mean output error it shows on the
    # calibration data (per output channel, layer by layer in order: each sees the layers
    # before it already corrected), as NNCF's bias correction does
    bias_correction: bool = False

    def __post_init__(self) -> None:
        self.skip = list(self.skip)
        self.validate()

    @property
    def symmetric(self) -> bool:
        """Whether activations (and, unless ``weight_method`` says otherwise, weights) are."""
        return self.method == "symmetric"

    @property
    def dynamic(self) -> bool:
        """Whether activations are quantized per row at run time (no calibration)."""
        return self.calibration == "dynamic" and self.activation_bits is not None

    @property
    def weight_symmetric(self) -> bool:
        return (self.weight_method or self.method) == "symmetric"

    def validate(self) -> None:
        def bad(what: str) -> QuantizationError:
            return QuantizationError(f"QuantConfig: {what}")

        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            raise bad(f"weight_bits must be an int in 2..8, got {self.weight_bits!r}")
        if self.activation_bits is not None and (not isinstance(self.activation_bits, int)
                                                 or not 2 <= self.activation_bits <= 8):
            raise bad(f"activation_bits must be an int in 2..8 or None (weight-only), got "
                      f"{self.activation_bits!r}")
        if self.method not in METHODS:
            raise bad(f"method must be one of {METHODS}, got {self.method!r}")
        if self.weight_method is not None and self.weight_method not in METHODS:
            raise bad(f"weight_method must be one of {METHODS} or None, got "
                      f"{self.weight_method!r}")
        if self.granularity not in GRANULARITIES:
            raise bad(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise bad(f"group_size must be an int >= 2, got {self.group_size!r}")
        if self.calibration not in CALIBRATIONS:
            raise bad(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.dynamic and self.activation_bits != 8:
            raise bad(f"calibration='dynamic' quantizes activations to 8 bits (int8 per row); "
                      f"got activation_bits={self.activation_bits!r}: set activation_bits=8, "
                      f"or choose a static calibrator {CALIBRATORS}")
        if not 50 < self.percentile <= 100:
            raise bad(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.weight_search not in ("minmax", "mse"):
            raise bad(f"weight_search must be 'minmax' or 'mse', got {self.weight_search!r}")
        if self.accuracy_budget is not None and not self.accuracy_budget >= 0:
            raise bad(f"accuracy_budget must be >= 0 (the largest metric drop), got "
                      f"{self.accuracy_budget!r}")
        for flag in ("embeddings", "bias_correction"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not all(isinstance(p, str) for p in self.skip):
            raise bad("skip must be a list of module-name patterns (strings)")

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` is left in float by a ``skip`` pattern."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    # --- JSON ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "QuantConfig", **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(d, dict) or d.get("type", "QuantConfig") != "QuantConfig":
            raise QuantizationError(f"not a QuantConfig: {d!r:.200}")
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - {"type"}
        if extra:
            raise QuantizationError(f"QuantConfig has no fields {sorted(extra)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise QuantizationError(f"QuantConfig JSON is malformed: {e}") from None
