"""The device catalog: published figures, lookup, runtime estimates, driver names."""

from __future__ import annotations

import dataclasses

import pytest

from market.catalog import (
    ALIASES,
    CATALOG,
    DEFAULT_UTILISATION_PCT,
    UnknownDeviceModel,
    expected_runtime_s,
    lookup,
    model_for_device_name,
)
from protocol.errors import MercatoError
from protocol.messages import DeviceGroup

REQUIRED = [
    "A100-40GB",
    "A100-80GB",
    "H100-SXM",
    "H100-PCIe",
    "H200",
    "L4",
    "T4",
    "RTX-3090",
    "RTX-4090",
    "MI300X",
    "Bow-IPU",
    "cpu",
    "sim-gpu-small",
    "sim-gpu-large",
    "sim-ipu",
]


class TestEntries:
    def test_required_models_present(self) -> None:
        assert set(REQUIRED) <= set(CATALOG)

    @pytest.mark.parametrize("name", sorted(CATALOG))
    def test_every_entry_has_positive_integer_figures_and_a_source(self, name: str) -> None:
        m = CATALOG[name]
        assert m.name == name
        for field in ("memory_bytes", "fp16_flops", "memory_bandwidth"):
            value = getattr(m, field)
            assert type(value) is int
            assert value > 0
        assert type(m.interconnect_bandwidth) is int
        assert (m.interconnect_bandwidth > 0) == (m.interconnect != "none")
        assert len(m.source) > 20
        if not m.simulated and m.kind != "cpu":
            assert "https://" in m.source  # a real spec sheet, not hearsay

    @pytest.mark.parametrize("name", sorted(CATALOG))
    def test_every_entry_fits_an_advert_device_group(self, name: str) -> None:
        m = CATALOG[name]
        group = DeviceGroup(
            model=m.name,
            kind=m.kind,
            ids=["d0"],
            free=["d0"],
            memory_bytes=m.memory_bytes,
            fp16_flops=m.fp16_flops,
            memory_bandwidth=m.memory_bandwidth,
            price_floor=0,
            simulated=m.simulated,
        )
        assert group.model == name

    def test_only_sim_models_are_simulated(self) -> None:
        simulated = {n for n, m in CATALOG.items() if m.simulated}
        assert simulated == {n for n in CATALOG if n.startswith("sim-")}
        assert {"sim-gpu-small", "sim-gpu-large", "sim-ipu"} <= simulated

    def test_catalog_is_read_only(self) -> None:
        with pytest.raises(TypeError):
            CATALOG["H100-SXM"] = CATALOG["T4"]  # type: ignore[index]
        with pytest.raises(dataclasses.FrozenInstanceError):
            CATALOG["T4"].fp16_flops = 1  # type: ignore[misc]

    def test_device_model_refuses_bad_figures(self) -> None:
        base = CATALOG["T4"]
        with pytest.raises(ValueError, match="fp16_flops"):
            dataclasses.replace(base, fp16_flops=0)
        with pytest.raises(ValueError, match="memory_bytes"):
            dataclasses.replace(base, memory_bytes=16e9)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="interconnect_bandwidth"):
            dataclasses.replace(base, interconnect_bandwidth=0)


class TestPublishedFigures:
    def test_h100_sxm_dense_fp16_is_about_989_tflops(self) -> None:
        h100 = CATALOG["H100-SXM"]
        assert 985 * 10**12 <= h100.fp16_flops <= 990 * 10**12
        assert h100.memory_bytes == 80 * 10**9
        assert h100.memory_bandwidth == 3_350 * 10**9

    def test_nvlink_is_per_direction_half_the_sheet_total(self) -> None:
        # NVIDIA prints 900 GB/s (H100/H200) and 600 GB/s (A100) for both directions.
        assert CATALOG["H100-SXM"].interconnect_bandwidth == 450 * 10**9
        assert CATALOG["H200"].interconnect_bandwidth == 450 * 10**9
        assert CATALOG["A100-80GB"].interconnect_bandwidth == 300 * 10**9

    def test_pcie_cards_use_pcie_per_direction(self) -> None:
        assert CATALOG["H100-PCIe"].interconnect_bandwidth == 64 * 10**9  # Gen5 x16
        assert CATALOG["L4"].interconnect_bandwidth == 32 * 10**9  # Gen4 x16
        assert CATALOG["T4"].interconnect_bandwidth < 16 * 10**9  # Gen3 x16

    def test_bow_ipu_exactly_as_graphcore_publishes(self) -> None:
        bow = CATALOG["Bow-IPU"]
        assert bow.kind == "ipu"
        assert bow.vendor == "Graphcore"
        assert bow.fp16_flops == 350 * 10**12
        assert bow.memory_bytes == 900 * 10**6
        assert bow.memory_bandwidth == 65 * 10**12
        assert bow.interconnect == "ipu-link"
        assert bow.interconnect_bandwidth == 320 * 10**9

    def test_a100_variants_differ_in_memory_not_compute(self) -> None:
        a40, a80 = CATALOG["A100-40GB"], CATALOG["A100-80GB"]
        assert a40.fp16_flops == a80.fp16_flops == 312 * 10**12
        assert a40.memory_bytes * 2 == a80.memory_bytes
        assert a40.memory_bandwidth < a80.memory_bandwidth

    def test_mi300x(self) -> None:
        mi = CATALOG["MI300X"]
        assert mi.vendor == "AMD"
        assert mi.memory_bytes == 192 * 10**9
        assert mi.interconnect == "infinity-fabric"

    def test_generations_are_ordered(self) -> None:
        flops = {n: CATALOG[n].fp16_flops for n in ("H100-SXM", "A100-80GB", "T4")}
        assert flops["H100-SXM"] > flops["A100-80GB"] > flops["T4"]
        bandwidth = {n: CATALOG[n].memory_bandwidth for n in ("H200", "H100-SXM", "A100-80GB")}
        assert bandwidth["H200"] > bandwidth["H100-SXM"] > bandwidth["A100-80GB"]
        assert CATALOG["H100-SXM"].fp16_flops > CATALOG["H100-PCIe"].fp16_flops
        assert CATALOG["RTX-4090"].fp16_flops > CATALOG["RTX-3090"].fp16_flops

    def test_cpu_is_far_slower_than_any_accelerator(self) -> None:
        cpu = CATALOG["cpu"]
        assert cpu.kind == "cpu"
        assert all(cpu.fp16_flops * 100 < m.fp16_flops for m in CATALOG.values() if m.kind != "cpu")


class TestLookup:
    @pytest.mark.parametrize(
        ("typed", "expected"),
        [
            ("H100-SXM", "H100-SXM"),
            ("h100-sxm", "H100-SXM"),
            ("  h100 sxm ", "H100-SXM"),
            ("h100", "H100-SXM"),
            ("H100", "H100-SXM"),
            ("h100-pcie", "H100-PCIe"),
            ("a100", "A100-80GB"),
            ("a100-40gb", "A100-40GB"),
            ("rtx_3090", "RTX-3090"),
            ("4090", "RTX-4090"),
            ("bow", "Bow-IPU"),
            ("mi300x", "MI300X"),
            ("CPU", "cpu"),
            ("SIM-GPU-SMALL", "sim-gpu-small"),
        ],
    )
    def test_case_insensitive_with_aliases(self, typed: str, expected: str) -> None:
        assert lookup(typed) is CATALOG[expected]

    def test_every_alias_points_at_a_catalog_entry(self) -> None:
        assert set(ALIASES.values()) <= set(CATALOG)

    def test_unknown_name_suggests_close_matches(self) -> None:
        with pytest.raises(UnknownDeviceModel) as info:
            lookup("H100X")
        err = info.value
        assert "H100-SXM" in err.suggestions
        assert "H100-SXM" in str(err)
        assert "'H100X'" in str(err)
        assert err.code == "unknown_device_model"

    def test_misspelling_suggests_the_right_model(self) -> None:
        with pytest.raises(UnknownDeviceModel, match="MI300X"):
            lookup("MI-300X")
        with pytest.raises(UnknownDeviceModel, match="RTX-4090"):
            lookup("RTX-4080")

    def test_nonsense_lists_every_known_model(self) -> None:
        with pytest.raises(UnknownDeviceModel) as info:
            lookup("quantum-toaster")
        assert info.value.suggestions == ()
        assert all(name in str(info.value) for name in CATALOG)

    def test_error_is_in_the_mercato_tree_and_a_key_error(self) -> None:
        with pytest.raises(UnknownDeviceModel) as info:
            lookup("nope")
        assert isinstance(info.value, MercatoError)
        assert isinstance(info.value, KeyError)
        assert not str(info.value).startswith("'")  # not KeyError's quoted repr


class TestExpectedRuntime:
    def test_runtime_at_default_utilisation(self) -> None:
        h100 = CATALOG["H100-SXM"]
        flop = 6 * 10**9 * 10**9  # 6 x 1B params x 1B tokens
        expected = flop / (h100.fp16_flops * DEFAULT_UTILISATION_PCT / 100)
        assert expected_runtime_s(flop, h100) == pytest.approx(expected)
        assert DEFAULT_UTILISATION_PCT == 40

    def test_full_utilisation_is_the_peak_rate(self) -> None:
        sim = CATALOG["sim-gpu-large"]  # 10**15 FLOP/s
        assert expected_runtime_s(10**15, sim, utilisation_pct=100) == pytest.approx(1.0)
        assert expected_runtime_s(10**15, sim, utilisation_pct=50) == pytest.approx(2.0)
        assert expected_runtime_s(0, sim) == 0.0

    def test_faster_device_finishes_sooner(self) -> None:
        flop = 10**18
        times = [expected_runtime_s(flop, CATALOG[n]) for n in ("H100-SXM", "A100-80GB", "T4")]
        assert times == sorted(times)
        assert times[0] < times[1] < times[2]

    @pytest.mark.parametrize("pct", [0, -5, 101])
    def test_utilisation_out_of_range_is_refused(self, pct: int) -> None:
        with pytest.raises(ValueError, match="utilisation_pct"):
            expected_runtime_s(10**12, CATALOG["T4"], utilisation_pct=pct)

    def test_negative_work_is_refused(self) -> None:
        with pytest.raises(ValueError, match="flop"):
            expected_runtime_s(-1, CATALOG["T4"])


class TestDriverNames:
    @pytest.mark.parametrize(
        ("reported", "expected"),
        [
            ("NVIDIA H100 80GB HBM3", "H100-SXM"),
            ("NVIDIA H100 PCIe", "H100-PCIe"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
            ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
            ("NVIDIA A100 80GB PCIe", "A100-80GB"),
            ("Tesla T4", "T4"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA GeForce RTX 3090", "RTX-3090"),
            ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ],
    )
    def test_known_names_map_to_the_catalog(self, reported: str, expected: str) -> None:
        model = model_for_device_name(reported)
        assert model is not None
        assert model.name == expected

    @pytest.mark.parametrize(
        "reported",
        [
            "NVIDIA H100 NVL",
            "NVIDIA L40S",
            "NVIDIA GeForce RTX 3090 Ti",
            "NVIDIA GeForce RTX 4090 Laptop GPU",
            "NVIDIA GeForce RTX 4090 D",
            "NVIDIA GeForce GTX 1080",
            "",
        ],
    )
    def test_variants_we_do_not_carry_map_to_nothing(self, reported: str) -> None:
        assert model_for_device_name(reported) is None
