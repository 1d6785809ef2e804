"""The provider inventory: config declarations, NVML detection, advert records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from market.catalog import CATALOG, model_for_device_name
from node.provider.inventory import (
    DetectedGpu,
    DeviceDecl,
    InterconnectDecl,
    InventoryError,
    build_inventory,
    detect_nvidia,
    usable_cpus,
)
from protocol.envelope import open_envelope, seal
from protocol.identity import Identity
from protocol.messages import Advert

NOW_MS = 1_700_000_000_000


def decl(
    model: str, count: int = 1, price_floor: int | str = 1_000_000, **kw: object
) -> DeviceDecl:
    return DeviceDecl.model_validate(
        {"model": model, "count": count, "price_floor": price_floor, **kw}
    )


def errors_at(exc: ValidationError) -> dict[str, str]:
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in exc.errors()}


class _Config(BaseModel):
    """A stand-in for the provider config: the declarations are embedded as a list."""

    devices: list[DeviceDecl]


class TestDeviceDecl:
    def test_alias_is_stored_as_the_catalog_name(self) -> None:
        assert decl("h100").model == "H100-SXM"
        assert decl("bow ipu").model == "Bow-IPU"
        assert decl("h100").catalog is CATALOG["H100-SXM"]

    def test_unknown_model_names_the_field_and_close_matches(self) -> None:
        with pytest.raises(ValidationError) as info:
            _Config.model_validate({"devices": [{"model": "H100X", "count": 1, "price_floor": 1}]})
        where = errors_at(info.value)
        assert list(where) == ["devices.0.model"]
        assert "H100X" in where["devices.0.model"]
        assert "H100-SXM" in where["devices.0.model"]

    @pytest.mark.parametrize("count", [0, -1, 1025])
    def test_count_out_of_range_names_the_field(self, count: int) -> None:
        with pytest.raises(ValidationError) as info:
            decl("T4", count=count)
        assert list(errors_at(info.value)) == ["count"]

    def test_several_bad_fields_are_all_reported(self) -> None:
        with pytest.raises(ValidationError) as info:
            DeviceDecl.model_validate({"model": "nope", "count": 0, "price_floor": 1.5})
        assert set(errors_at(info.value)) == {"model", "count", "price_floor"}

    @pytest.mark.parametrize(
        ("written", "micro"),
        [
            (2_500_000, 2_500_000),
            (0, 0),
            ("2.50 credits", 2_500_000),
            ("1 credit", 1_000_000),
            ("0.000001 credits", 1),
            (" 12 Credits ", 12_000_000),
        ],
    )
    def test_price_floor_in_micro_credits_or_credits_text(
        self, written: int | str, micro: int
    ) -> None:
        price = decl("T4", price_floor=written).price_floor
        assert price == micro
        assert type(price) is int

    @pytest.mark.parametrize(
        "written", [2.5, 2.0, True, "2.5", "2.50 dollars", "0.0000001 credits", "-1 credits", -1]
    )
    def test_price_floor_refuses_floats_and_other_text(self, written: object) -> None:
        with pytest.raises(ValidationError) as info:
            DeviceDecl.model_validate({"model": "T4", "count": 1, "price_floor": written})
        assert list(errors_at(info.value)) == ["price_floor"]

    def test_float_price_error_says_why(self) -> None:
        with pytest.raises(ValidationError, match="never a float"):
            decl("T4", price_floor=2.5)  # type: ignore[arg-type]

    def test_unknown_setting_and_string_count_are_refused(self) -> None:
        with pytest.raises(ValidationError) as info:
            DeviceDecl.model_validate({"model": "T4", "count": "2", "price_floor": 1, "colour": 1})
        assert set(errors_at(info.value)) == {"count", "colour"}

    def test_declaration_is_frozen(self) -> None:
        d = decl("T4")
        with pytest.raises(ValidationError):
            d.count = 3  # type: ignore[misc]


class TestInterconnectDecl:
    def test_none_with_bandwidth_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="bandwidth"):
            InterconnectDecl(kind="none", bandwidth=10)

    def test_unknown_kind_is_refused(self) -> None:
        with pytest.raises(ValidationError) as info:
            InterconnectDecl.model_validate({"kind": "carrier-pigeon"})
        assert list(errors_at(info.value)) == ["kind"]


class TestDetection:
    def test_no_gpu_here_gives_an_empty_list_without_raising(self) -> None:
        found = detect_nvidia()
        assert isinstance(found, list)
        assert all(isinstance(g, DetectedGpu) for g in found)
        if not Path("/dev/nvidiactl").exists():
            assert found == []

    def test_undetected_real_h100_is_refused(self) -> None:
        if detect_nvidia():
            pytest.skip("this host has NVIDIA GPUs")
        with pytest.raises(InventoryError) as info:
            build_inventory([decl("T4", price_floor=5), decl("h100", count=2)])
        message = str(info.value)
        assert "devices[0]" in message  # T4 is the first NVIDIA entry short of cards
        assert "simulated = true" in message
        assert info.value.code == "bad_inventory"

    def test_same_declaration_simulated_is_accepted_on_this_host(self) -> None:
        inv = build_inventory([decl("h100", count=2, simulated=True)])
        assert inv.ids == ("gpu0", "gpu1")
        assert all(g.simulated for g in inv.groups)

    def test_non_nvidia_devices_are_taken_on_the_operators_word(self) -> None:
        inv = build_inventory([decl("MI300X", count=8), decl("Bow-IPU", count=4)])
        assert [g.simulated for g in inv.groups] == [False, False]
        assert inv.ids[-1] == "ipu3"

    def test_more_real_cpu_slots_than_cores_is_refused(self) -> None:
        too_many = usable_cpus() + 1
        with pytest.raises(InventoryError, match="cpu"):
            build_inventory([decl("cpu", count=too_many)])
        assert build_inventory([decl("cpu", count=too_many, simulated=True)]).ids[-1] == (
            f"cpu{too_many - 1}"
        )
        assert build_inventory([decl("cpu", count=too_many)], detect=False).ids

    def test_usable_cpus_matches_the_affinity_mask(self) -> None:
        assert usable_cpus() == len(os.sched_getaffinity(0))


def _gpu(index: int, name: str) -> DetectedGpu:
    model = model_for_device_name(name)
    catalog_name = model.name if model is not None else None
    return DetectedGpu(index, name, f"GPU-{index:08d}", 85 * 10**9, catalog_name)


class TestWithGivenNvmlRecords:
    """Matching logic fed with NVML-shaped records, since this host has no GPU."""

    HOST = (
        _gpu(0, "NVIDIA H100 80GB HBM3"),
        _gpu(1, "NVIDIA L4"),
        _gpu(2, "NVIDIA H100 80GB HBM3"),
        _gpu(3, "NVIDIA H100 80GB HBM3"),
    )

    def test_declared_gpus_bind_to_physical_ones_in_index_order(self) -> None:
        inv = build_inventory([decl("h100", count=2), decl("L4")], detected=self.HOST)
        h100, l4 = inv.groups
        assert h100.ids == ("gpu0", "gpu1")
        assert h100.host_uuids == ("GPU-00000000", "GPU-00000002")
        assert l4.ids == ("gpu2",)
        assert l4.host_uuids == ("GPU-00000001",)
        assert inv.cuda_visible_devices(["gpu1", "gpu2"]) == "GPU-00000002,GPU-00000001"
        assert [g.index for g in inv.undeclared] == [3]

    def test_declaring_more_than_found_names_the_entry_and_what_was_found(self) -> None:
        with pytest.raises(InventoryError) as info:
            build_inventory([decl("L4"), decl("h100", count=4)], detected=self.HOST)
        message = str(info.value)
        assert "devices[1]" in message
        assert "4 x H100-SXM" in message
        assert "3 x H100-SXM" in message

    def test_wrong_variant_is_caught(self) -> None:
        with pytest.raises(InventoryError, match="H100-PCIe"):
            build_inventory([decl("H100-PCIe")], detected=self.HOST)

    def test_simulated_devices_do_not_consume_physical_ones(self) -> None:
        inv = build_inventory(
            [decl("h100", count=1, simulated=True), decl("h100", count=3)], detected=self.HOST
        )
        assert inv.groups[0].host_uuids == ()
        assert len(inv.groups[1].host_uuids) == 3
        assert inv.cuda_visible_devices(["gpu0"]) == ""

    def test_detection_off_ignores_the_host(self) -> None:
        inv = build_inventory([decl("h100", count=8)], detect=False, detected=self.HOST)
        assert inv.groups[0].host_uuids == ()
        assert inv.undeclared == ()


class TestInventory:
    def test_ids_are_unique_across_groups(self) -> None:
        inv = build_inventory(
            [
                decl("sim-gpu-small", count=2),
                decl("sim-ipu", count=2),
                decl("sim-gpu-large", count=3),
                decl("cpu", count=1, simulated=True),
            ]
        )
        assert inv.ids == ("gpu0", "gpu1", "ipu0", "ipu1", "gpu2", "gpu3", "gpu4", "cpu0")
        assert len(set(inv.ids)) == len(inv.ids)
        assert inv.group_of("gpu3").model.name == "sim-gpu-large"

    def test_sim_models_are_always_marked_simulated(self) -> None:
        inv = build_inventory([decl("sim-gpu-small", simulated=False)])
        assert inv.device_groups(set())[0].simulated is True

    def test_device_groups_carry_figures_prices_and_free_ids(self) -> None:
        inv = build_inventory(
            [decl("H200", count=4, price_floor="3 credits", simulated=True), decl("sim-ipu")]
        )
        h200, ipu = inv.device_groups({"gpu3", "gpu1", "ipu0"})
        assert h200.model == "H200"
        assert h200.kind == "gpu"
        assert h200.ids == ["gpu0", "gpu1", "gpu2", "gpu3"]
        assert h200.free == ["gpu1", "gpu3"]
        assert h200.memory_bytes == 141 * 10**9
        assert h200.fp16_flops == CATALOG["H200"].fp16_flops
        assert h200.price_floor == 3_000_000
        assert ipu.free == ["ipu0"]
        assert ipu.kind == "ipu"

    def test_overrides_replace_catalog_figures(self) -> None:
        inv = build_inventory(
            [decl("cpu", memory_bytes=64 * 10**9, fp16_flops=10**12, memory_bandwidth=10**10)],
            detect=False,
        )
        (group,) = inv.device_groups({"cpu0"})
        assert (group.memory_bytes, group.fp16_flops, group.memory_bandwidth) == (
            64 * 10**9,
            10**12,
            10**10,
        )

    def test_free_ids_not_in_the_inventory_are_an_error(self) -> None:
        inv = build_inventory([decl("sim-gpu-small", count=2)])
        with pytest.raises(InventoryError, match="gpu7"):
            inv.device_groups({"gpu0", "gpu7"})
        with pytest.raises(InventoryError, match="gpu9"):
            inv.group_of("gpu9")

    def test_nothing_declared_is_an_error(self) -> None:
        with pytest.raises(InventoryError, match="devices"):
            build_inventory([])

    def test_advert_from_the_inventory_survives_signing_and_verification(self) -> None:
        inv = build_inventory(
            [decl("sim-gpu-large", count=8, price_floor="2.5 credits"), decl("sim-ipu", count=2)],
            InterconnectDecl(kind="pcie", bandwidth=32 * 10**9),
        )
        me = Identity.generate()
        advert = Advert(
            provider=me.node_id,
            address="http://127.0.0.1:7400",
            devices=inv.device_groups({"gpu0", "gpu5", "ipu1"}),
            interconnect=inv.interconnect_message(),
            seq=1,
            expires_ms=NOW_MS + 60_000,
        )
        opened = open_envelope(
            seal(me, advert, now_ms=NOW_MS, nonce=os.urandom(16)), now_ms=NOW_MS, replay=None
        )
        assert opened.body == advert
        assert isinstance(opened.body, Advert)
        assert opened.body.free_units == 3


class TestInterconnect:
    def test_default_is_the_catalog_fabric_over_all_devices(self) -> None:
        inv = build_inventory([decl("H100-SXM", count=8, simulated=True)])
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size) == ("nvlink", 450 * 10**9, 8)

    def test_default_takes_the_slower_of_two_same_kind_models(self) -> None:
        inv = build_inventory(
            [decl("H100-SXM", count=4, simulated=True), decl("A100-80GB", count=4, simulated=True)]
        )
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size) == ("nvlink", 300 * 10**9, 8)

    def test_mixed_fabrics_without_declaration_offer_no_gang(self) -> None:
        inv = build_inventory([decl("sim-gpu-small"), decl("sim-ipu")])
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size) == ("none", 0, 1)

    def test_cpu_only_has_no_fabric(self) -> None:
        inv = build_inventory([decl("cpu", count=1)])
        assert inv.interconnect_message().kind == "none"

    def test_declared_kind_matching_the_catalog_defaults_bandwidth(self) -> None:
        inv = build_inventory(
            [decl("Bow-IPU", count=4)], InterconnectDecl(kind="ipu-link", gang_size=2)
        )
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size) == ("ipu-link", 320 * 10**9, 2)

    def test_declared_bandwidth_wins(self) -> None:
        # An RTX 3090 pair with an NVLink bridge: 56.25 GB/s per direction.
        inv = build_inventory(
            [decl("RTX-3090", count=2, simulated=True)],
            InterconnectDecl(kind="nvlink", bandwidth=56_250_000_000, latency_us=2),
        )
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size, ic.latency_us) == (
            "nvlink",
            56_250_000_000,
            2,
            2,
        )

    def test_foreign_kind_without_bandwidth_names_the_field(self) -> None:
        with pytest.raises(InventoryError, match=r"interconnect\.bandwidth"):
            build_inventory(
                [decl("RTX-3090", count=2, simulated=True)], InterconnectDecl(kind="nvlink")
            )

    def test_gang_larger_than_the_devices_names_the_field(self) -> None:
        with pytest.raises(InventoryError, match=r"interconnect\.gang_size"):
            build_inventory(
                [decl("sim-gpu-large", count=2)], InterconnectDecl(kind="nvlink", gang_size=4)
            )

    def test_declared_none_means_no_gang(self) -> None:
        inv = build_inventory([decl("sim-gpu-large", count=2)], InterconnectDecl(kind="none"))
        ic = inv.interconnect_message()
        assert (ic.kind, ic.bandwidth, ic.gang_size) == ("none", 0, 1)
