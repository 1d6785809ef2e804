"""The device catalog: published figures of the accelerators the market knows.

Every figure is an integer in SI units, taken from the vendor's spec sheet named in
``source``:

* ``memory_bytes`` uses decimal gigabytes as printed on the sheet (80 GB = 80 * 10**9),
  which never overstates a card (the H100's 80 GB is 85.5 * 10**9 bytes in practice);
* ``fp16_flops`` is *dense* FP16/BF16 tensor throughput with FP32 accumulate. NVIDIA
  sheets since Ampere print the 2:4-sparsity figure with an asterisk; we halve it;
* ``interconnect_bandwidth`` is bytes/s **per direction per device**. NVIDIA and AMD
  print NVLink / Infinity Fabric as the total of both directions; we halve it.
  PCIe per direction, after 128b/130b encoding (PCI-SIG, PCI Express Base Spec 3.0-5.0):
  Gen3 x16 8 GT/s = 15.75 GB/s, Gen4 x16 16 GT/s = 31.5 GB/s (sheets round to 32 GB/s,
  "64 GB/s" bidirectional), Gen5 x16 32 GT/s = 63 GB/s (sheets: 64, "128 GB/s").

The ``sim-*`` models do not exist: they are fixed, round, fictitious figures for local
test clusters, marked ``simulated=True`` so no advert can pass them off as hardware.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from protocol.errors import ImplausibleAdvertError, MercatoError
from protocol.messages import Advert

DeviceKind = Literal["gpu", "ipu", "cpu"]
InterconnectKind = Literal["nvlink", "infinity-fabric", "ipu-link", "pcie", "none"]

GB = 10**9
TB = 10**12
TFLOPS = 10**12
GFLOPS = 10**9

# PCIe x16 per direction, rounded the way the GPU sheets round it (see module docstring).
PCIE_GEN3_X16 = 15_750_000_000
PCIE_GEN4_X16 = 32 * GB
PCIE_GEN5_X16 = 64 * GB
_PCIE_SOURCE = "PCI-SIG, PCI Express Base Specification Rev. 4.0/5.0 (16/32 GT/s per lane)"

#: Default model FLOP utilisation (MFU) for runtime estimates, in percent. Large training
#: runs reach 21-46% of peak (Chowdhery et al. 2022, "PaLM", arXiv:2204.02311, Table 3:
#: GPT-3 21.3%, Gopher 32.5%, Megatron-Turing NLG 30.2%, PaLM 46.2%); 40 sits inside
#: the usual 30-50% band of well-tuned jobs.
DEFAULT_UTILISATION_PCT = 40


class UnknownDeviceModel(MercatoError, KeyError):
    """A device model name that is not in the catalog (the message lists close matches)."""

    code = "unknown_device_model"
    http_status = 400

    def __init__(self, name: str, suggestions: tuple[str, ...]) -> None:
        if suggestions:
            hint = "did you mean " + ", ".join(suggestions) + "?"
        else:
            hint = "known models: " + ", ".join(CATALOG)
        super().__init__(f"unknown device model {name!r}; {hint}")
        self.name = name
        self.suggestions = suggestions

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return f"{self.code}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """One accelerator model and its published per-device figures."""

    name: str
    vendor: str
    kind: DeviceKind
    memory_bytes: int
    fp16_flops: int  # dense FP16/BF16 tensor FLOP/s, no sparsity
    memory_bandwidth: int  # bytes/s
    interconnect: InterconnectKind
    interconnect_bandwidth: int  # bytes/s per direction per device; 0 only for "none"
    source: str  # URL and title of the spec sheet the figures come from
    simulated: bool = False

    def __post_init__(self) -> None:
        for field in ("memory_bytes", "fp16_flops", "memory_bandwidth"):
            value = getattr(self, field)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{self.name}: {field} must be a positive int, got {value!r}")
        if self.kind not in get_args(DeviceKind):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if self.interconnect not in get_args(InterconnectKind):
            raise ValueError(f"{self.name}: unknown interconnect {self.interconnect!r}")
        bw = self.interconnect_bandwidth
        if type(bw) is not int or bw < 0 or (bw == 0) != (self.interconnect == "none"):
            raise ValueError(f"{self.name}: interconnect_bandwidth must be > 0 (0 only for none)")


_A100_SRC = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf - NVIDIA A100 Tensor Core GPU "
    "datasheet (FP16 312 TFLOPS dense; NVLink 600 GB/s total = 300 per direction)"
)
_H100_SRC = (
    "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet - "
    "NVIDIA H100 Tensor Core GPU datasheet, with NVIDIA H100 Tensor Core GPU Architecture "
    "whitepaper (dense FP16 tensor: SXM5 989.4, PCIe 756.5 TFLOPS)"
)
_H200_SRC = (
    "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446 - "
    "NVIDIA H200 Tensor Core GPU datasheet (141 GB HBM3e, 4.8 TB/s, FP16 1,979 TFLOPS "
    "sparse; NVLink 900 GB/s total = 450 per direction)"
)
_L4_SRC = (
    "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet - "
    "NVIDIA L4 Tensor Core GPU datasheet (FP16 242 TFLOPS sparse = 121 dense; PCIe Gen4)"
)
_T4_SRC = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/"
    "t4-tensor-core-datasheet-951643.pdf - NVIDIA T4 Tensor Core GPU datasheet "
    "(mixed-precision FP16/FP32 65 TFLOPS, no sparsity on Turing; PCIe Gen3 x16)"
)
_GA102_SRC = (
    "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
    " - NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090 column (FP16 tensor with"
    " FP32 accumulate 71 TFLOPS dense; GeForce runs FP32 accumulate at half rate)"
)
_AD102_SRC = (
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/"
    "nvidia-ada-gpu-architecture.pdf - NVIDIA Ada GPU Architecture whitepaper, RTX 4090 "
    "column (FP16 tensor with FP32 accumulate 165.2 TFLOPS dense)"
)
_MI300X_SRC = (
    "https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/"
    "amd-instinct-mi300x-data-sheet.pdf - AMD Instinct MI300X accelerator data sheet "
    "(FP16/BF16 1,307.4 TFLOPS dense; 7 Infinity Fabric links x 128 GB/s = 896 GB/s "
    "bidirectional = 448 per direction)"
)
_BOW_SRC = (
    "https://www.graphcore.ai/products/bow-ipu - Graphcore Bow IPU / Bow-2000 IPU-Machine "
    "datasheet (350 TFLOPS AI compute, 900 MB In-Processor-Memory at 65 TB/s, IPU-Links "
    "320 GB/s chip to chip; the sheet does not split directions, taken as printed)"
)
_CPU_SRC = (
    "nominal one-core slot of an x86-64 host: 3.0 GHz x 32 FP32 FLOP/cycle (two 256-bit "
    "FMA units, Intel 64 and IA-32 Architectures Optimization Reference Manual), 4 GB and "
    "1/8 of dual-channel DDR4-3200 (JEDEC JESD79-4: 2 x 25.6 GB/s); CPUs have no FP16 "
    "speed-up under AVX2, so the FP32 rate stands in"
)
_SIM_SRC = "fictitious: round figures defined in market/catalog.py for local test clusters"


def _nvidia(
    name: str,
    mem: int,
    flops: int,
    bw: int,
    link: InterconnectKind,
    link_bw: int,
    src: str,
) -> DeviceModel:
    return DeviceModel(name, "NVIDIA", "gpu", mem, flops, bw, link, link_bw, src)


_MODELS: tuple[DeviceModel, ...] = (
    _nvidia("A100-40GB", 40 * GB, 312 * TFLOPS, 1_555 * GB, "nvlink", 300 * GB, _A100_SRC),
    _nvidia("A100-80GB", 80 * GB, 312 * TFLOPS, 2_039 * GB, "nvlink", 300 * GB, _A100_SRC),
    _nvidia("H100-SXM", 80 * GB, 989_400 * GFLOPS, 3_350 * GB, "nvlink", 450 * GB, _H100_SRC),
    _nvidia("H100-PCIe", 80 * GB, 756_500 * GFLOPS, 2_000 * GB, "pcie", PCIE_GEN5_X16, _H100_SRC),
    _nvidia("H200", 141 * GB, 989_400 * GFLOPS, 4_800 * GB, "nvlink", 450 * GB, _H200_SRC),
    _nvidia("L4", 24 * GB, 121 * TFLOPS, 300 * GB, "pcie", PCIE_GEN4_X16, _L4_SRC),
    _nvidia("T4", 16 * GB, 65 * TFLOPS, 320 * GB, "pcie", PCIE_GEN3_X16, _T4_SRC),
    _nvidia("RTX-3090", 24 * GB, 71 * TFLOPS, 936 * GB, "pcie", PCIE_GEN4_X16, _GA102_SRC),
    _nvidia("RTX-4090", 24 * GB, 165_200 * GFLOPS, 1_008 * GB, "pcie", PCIE_GEN4_X16, _AD102_SRC),
    DeviceModel(
        "MI300X",
        "AMD",
        "gpu",
        192 * GB,
        1_307_400 * GFLOPS,
        5_300 * GB,
        "infinity-fabric",
        448 * GB,
        _MI300X_SRC,
    ),
    DeviceModel(
        "Bow-IPU",
        "Graphcore",
        "ipu",
        900_000_000,
        350 * TFLOPS,
        65 * TB,
        "ipu-link",
        320 * GB,
        _BOW_SRC,
    ),
    DeviceModel("cpu", "generic", "cpu", 4 * GB, 96 * GFLOPS, 6_400_000_000, "none", 0, _CPU_SRC),
    DeviceModel(
        "sim-gpu-small",
        "simulated",
        "gpu",
        16 * GB,
        100 * TFLOPS,
        500 * GB,
        "pcie",
        PCIE_GEN4_X16,
        _SIM_SRC,
        simulated=True,
    ),
    DeviceModel(
        "sim-gpu-large",
        "simulated",
        "gpu",
        80 * GB,
        1_000 * TFLOPS,
        3_000 * GB,
        "nvlink",
        450 * GB,
        _SIM_SRC,
        simulated=True,
    ),
    DeviceModel(
        "sim-ipu",
        "simulated",
        "ipu",
        900_000_000,
        350 * TFLOPS,
        65 * TB,
        "ipu-link",
        320 * GB,
        _SIM_SRC,
        simulated=True,
    ),
)

#: Every known model by its canonical name (read-only).
CATALOG: Mapping[str, DeviceModel] = MappingProxyType({m.name: m for m in _MODELS})

#: Short names people type. An unqualified name means the SXM part, as in NVIDIA's own
#: naming (the PCIe card is always called "... PCIe"); "a100" is the 80 GB SXM4, the one
#: clouds rent today. A provider's real cards are checked against NVML, so an alias that
#: picks the wrong variant is caught at start-up rather than advertised.
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "a100": "A100-80GB",
        "a100-sxm": "A100-80GB",
        "a100-40": "A100-40GB",
        "a100-80": "A100-80GB",
        "h100": "H100-SXM",
        "h100-sxm5": "H100-SXM",
        "h100-80gb": "H100-SXM",
        "h200-sxm": "H200",
        "3090": "RTX-3090",
        "4090": "RTX-4090",
        "geforce-rtx-3090": "RTX-3090",
        "geforce-rtx-4090": "RTX-4090",
        "mi300": "MI300X",
        "bow": "Bow-IPU",
        "ipu": "Bow-IPU",
        "bow-2000": "Bow-IPU",
    }
)


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_INDEX: Mapping[str, str] = MappingProxyType(
    {**{_normalise(n): n for n in CATALOG}, **{_normalise(a): n for a, n in ALIASES.items()}}
)


def lookup(name: str) -> DeviceModel:
    """The catalog entry for ``name``: case-insensitive, spaces or underscores for hyphens,
    aliases allowed. Raises UnknownDeviceModel naming the closest known names."""
    key = _normalise(name)
    canonical = _INDEX.get(key)
    if canonical is not None:
        return CATALOG[canonical]
    import difflib  # only for a name nobody knows: not held by every idle daemon

    close = difflib.get_close_matches(key, list(_INDEX), n=8, cutoff=0.6)
    suggestions = tuple(dict.fromkeys(_INDEX[c] for c in close))[:4]
    raise UnknownDeviceModel(name, suggestions)


def expected_runtime_s(
    flop: int, model: DeviceModel, utilisation_pct: int = DEFAULT_UTILISATION_PCT
) -> float:
    """Seconds one device of ``model`` needs for ``flop`` operations at the given model
    FLOP utilisation (percent of dense peak; see DEFAULT_UTILISATION_PCT)."""
    if flop < 0:
        raise ValueError(f"flop must be >= 0, got {flop}")
    if not 1 <= utilisation_pct <= 100:
        raise ValueError(f"utilisation_pct must be within 1..100, got {utilisation_pct}")
    return flop * 100 / (model.fp16_flops * utilisation_pct)


# NVML marketing names -> catalog, first match wins. Names seen from nvidia-smi:
# "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB",
# "NVIDIA A100 80GB PCIe", "NVIDIA H200", "Tesla T4", "NVIDIA L4",
# "NVIDIA GeForce RTX 4090". Variants we do not carry (H100 NVL, H200 NVL, RTX 3090 Ti,
# RTX 4090 D, laptop parts) map to nothing rather than to a faster or slower sibling.
# A100 PCIe cards map to the SXM entry of the same memory size: same peak FLOP/s and
# memory, 5% less memory bandwidth on the 80 GB card.
_NVML_NAMES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(p), m)
    for p, m in (
        (r"\b(NVL|LAPTOP|MOBILE|TI|D)\b", None),
        (r"\bH100\b.*\bPCIE\b", "H100-PCIe"),
        (r"\bH100\b", "H100-SXM"),
        (r"\bH200\b", "H200"),
        (r"\bA100\b.*\b80GB\b", "A100-80GB"),
        (r"\bA100\b", "A100-40GB"),
        (r"\bL4\b", "L4"),
        (r"\bT4\b", "T4"),
        (r"\bRTX 3090\b", "RTX-3090"),
        (r"\bRTX 4090\b", "RTX-4090"),
    )
)


def model_for_device_name(name: str) -> DeviceModel | None:
    """Best-effort catalog entry for a driver-reported device name, or None."""
    key = re.sub(r"[\s_-]+", " ", name.upper())
    for pattern, model in _NVML_NAMES:
        if pattern.search(key):
            return CATALOG[model] if model is not None else None
    return None


#: Most devices of a kind one advert (one host, one address) may hold. The largest
#: single GPU servers hold 16 (NVIDIA DGX-2, HGX-2); a Graphcore IPU-POD64 is 64 IPUs
#: behind one host server; 1,024 one-core slots covers the largest two-socket hosts
#: with room. A provider fronting a bigger cluster runs one daemon per host.
MAX_DEVICES_PER_HOST: Mapping[str, int] = MappingProxyType({"gpu": 16, "ipu": 64, "cpu": 1024})
#: How far an advert's per-device figures may exceed the catalog's (percent): factory
#: overclocked cards run a few percent above the reference sheet, never 10 % above.
FIGURE_SLACK_PCT = 10


def check_advert(advert: Advert) -> None:
    """Refuse an advert whose claims are not a thing: raise ImplausibleAdvertError.

    Every device model must be in the catalog with its kind; FLOP/s, memory and memory
    bandwidth at most ``FIGURE_SLACK_PCT`` above the published figure; at most
    ``MAX_DEVICES_PER_HOST`` devices of a kind. Keys are free, so a claim costs nothing
    to make: this bounds what one advert can win before measurement takes over.
    """
    counts: dict[str, int] = {}
    for g in advert.devices:
        try:
            model = lookup(g.model)
        except UnknownDeviceModel as e:
            raise ImplausibleAdvertError(
                f"device model {g.model!r} is not in the catalog: {e}"
            ) from None
        if g.kind != model.kind:
            raise ImplausibleAdvertError(f"{g.model} is a {model.kind}, not a {g.kind}")
        for what in ("fp16_flops", "memory_bytes", "memory_bandwidth"):
            claimed, published = getattr(g, what), getattr(model, what)
            if claimed * 100 > published * (100 + FIGURE_SLACK_PCT):
                raise ImplausibleAdvertError(
                    f"{g.model}: {what} {claimed} is above the catalog's {published} "
                    f"by more than {FIGURE_SLACK_PCT} %"
                )
        counts[g.kind] = counts.get(g.kind, 0) + len(g.ids)
    for kind, n in counts.items():
        if n > MAX_DEVICES_PER_HOST[kind]:
            raise ImplausibleAdvertError(
                f"{n} {kind} devices in one advert: one host holds at most "
                f"{MAX_DEVICES_PER_HOST[kind]}"
            )
