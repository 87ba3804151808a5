"""Transport files: round trip, and clear rejection of damaged or foreign files."""

import json
import os
import stat
import struct
import time

import pytest
import torch
from helpers import Stack, random_map
from safetensors.torch import save as save_tensors

from act import ActError, ModuleMap, Transport, TransportFileError, fit_transport, steer


def _fitted() -> Transport:
    generator = torch.Generator().manual_seed(0)
    source = {f"blocks.{i}.norm": torch.randn(20, 8, generator=generator) for i in range(2)}
    target = {site: samples * 2 + 1 for site, samples in source.items()}
    transport = fit_transport(source, target, support="q05", model=Stack())
    transport.info = {"source_prompts": ["a cat"], "description": "test"}
    transport.default_strength = 0.8
    return transport


def test_round_trip_keeps_maps_and_metadata(tmp_path):
    transport = _fitted()
    path = tmp_path / "nested" / "style.safetensors"
    transport.save(path)
    loaded = Transport.load(path)
    assert loaded.sites == transport.sites
    for site in transport.sites:
        for field in ("omega", "beta", "source_lo", "source_hi", "target_lo", "target_hi"):
            assert torch.equal(
                getattr(loaded.maps[site], field), getattr(transport.maps[site], field)
            )
    for field in ("method", "support", "source_samples", "target_samples", "model_class"):
        assert getattr(loaded, field) == getattr(transport, field)
    assert loaded.module_params == {s: {"weight": [8], "bias": [8]} for s in transport.sites}
    assert loaded.info == transport.info and loaded.default_strength == 0.8
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left nothing behind


def test_loaded_transport_checks_the_model_it_steers(tmp_path):
    path = tmp_path / "t.safetensors"
    _fitted().save(path)
    with pytest.raises(Exception, match=r"'blocks.0.norm'.*\(12,\).*\(8,\).*Stack"):
        steer(Stack(width=12), Transport.load(path))


def _header_and_tensors(data: bytes):
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return json.loads(header["__metadata__"]["act"])


def _rewrite(transport: Transport, edit) -> bytes:
    data = transport.to_bytes()
    header = _header_and_tensors(data)
    from safetensors.torch import load

    tensors = load(data)
    edit(header, tensors)
    return save_tensors(tensors, metadata={"act": json.dumps(header)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h, t: h.update(format="something-else"), "not an AcT transport"),
        (lambda h, t: h.update(format_version=99), "format version 99"),
        (lambda h, t: h.update(method="cubic"), "unknown method 'cubic'"),
        (lambda h, t: h.update(support="q70"), "unknown support 'q70'"),
        (lambda h, t: h.update(modules=[]), "lists no modules"),
        (lambda h, t: h["modules"][0].update(units=9), "expected float32 (9,)"),
        (lambda h, t: t.pop("blocks.1.norm/beta"), "lacks its 'beta'"),
        (lambda h, t: t.update({"extra": torch.zeros(2)}), "not described by the header"),
        (lambda h, t: t["blocks.0.norm/omega"].fill_(float("nan")), "contains NaN"),
        (lambda h, t: t.update({"blocks.0.norm/beta": torch.zeros(8).double()}), "float64"),
        (lambda h, t: h.update(source_samples=0), "sample counts"),
        (lambda h, t: t["blocks.0.norm/source_lo"].fill_(1e9), "lower bounds above"),
    ],
)
def test_inconsistent_files_are_rejected(edit, message):
    data = _rewrite(_fitted(), edit)
    with pytest.raises(TransportFileError) as raised:
        Transport.from_bytes(data, "bad.safetensors")
    assert message in str(raised.value) and "bad.safetensors" in str(raised.value)


def test_truncated_foreign_and_missing_files_are_rejected(tmp_path):
    data = _fitted().to_bytes()
    for cut in (0, 5, 40, len(data) - 10):
        with pytest.raises(TransportFileError, match=r"truncated|not a valid|no AcT header"):
            Transport.from_bytes(data[:cut])
    foreign = save_tensors({"weight": torch.zeros(3)})
    with pytest.raises(TransportFileError, match="no AcT header"):
        Transport.from_bytes(foreign)
    with pytest.raises(TransportFileError, match="cannot read transport file"):
        Transport.load(tmp_path / "missing.safetensors")


def test_repr_and_summary_describe_the_transport():
    transport = Transport({f"m{i}": random_map(4) for i in range(5)}, "mean", "all", 3, 4)
    assert "modules=5" in repr(transport) and "(+2)" in repr(transport)
    assert "5 modules, 20 units, method mean, support all" in transport.summary()


def test_component_selects_and_renames_sites_under_a_prefix():
    transport = Transport(
        {"unet.a": random_map(4), "unet.b:1": random_map(4), "text_encoder.c": random_map(4)},
        "linear",
        "all",
        3,
        3,
        module_params={"unet.a": {"weight": [4]}, "text_encoder.c": {"weight": [4]}},
    )
    unet = transport.component("unet")
    assert unet.sites == ["a", "b:1"] and unet.module_params == {"a": {"weight": [4]}}
    assert unet.maps["a"] is transport.maps["unet.a"] and unet.method == "linear"
    assert transport.component("text_encoder").sites == ["c"]
    assert transport.component("vae") is None
    assert transport.sites == ["unet.a", "unet.b:1", "text_encoder.c"]


def test_subset_keeps_the_named_sites_in_order():
    transport = Transport(
        {"a": random_map(4), "b": random_map(4), "c": random_map(4)},
        "mean",
        "all",
        3,
        3,
        module_params={"a": {"weight": [4]}, "c": {"weight": [4]}},
    )
    part = transport.subset(["c", "b"])
    assert part.sites == ["c", "b"] and part.module_params == {"c": {"weight": [4]}}
    with pytest.raises(Exception, match="not in this transport"):
        transport.subset(["z"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h, t: h.update(causal="false"), "invalid causal flag 'false'"),
        (lambda h, t: h.update(source_samples=True), "invalid sample counts"),
        (lambda h, t: h.update(default_strength="1"), "invalid default_strength '1'"),
        (lambda h, t: h.update(default_strength=1e300), "overflows float32"),
        (lambda h, t: h.update(info=[1, 2]), "invalid info field"),
        (lambda h, t: h.update(model_class=3), "invalid model_class 3"),
        (lambda h, t: h["modules"][0].update(units=True), "invalid unit count True"),
        (lambda h, t: t["blocks.0.norm/omega"].fill_(3e38), "overflows float32"),
    ],
)
def test_header_values_of_the_wrong_type_or_size_are_rejected(edit, message):
    with pytest.raises(TransportFileError, match=rf"bad.safetensors.*{message}"):
        Transport.from_bytes(_rewrite(_fitted(), edit), "bad.safetensors")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "a JSON list, not an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_headers_are_rejected_naming_the_file(header, message):
    data = save_tensors({"blocks.0.norm/omega": torch.ones(8)}, metadata={"act": header})
    with pytest.raises(TransportFileError, match=rf"odd.safetensors.*{message}"):
        Transport.from_bytes(data, "odd.safetensors")


def test_a_text_file_is_not_taken_for_a_truncated_transport(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("These are my notes, not a transport.\n" * 20)
    with pytest.raises(TransportFileError, match="is not a safetensors transport file"):
        Transport.load(path)


def test_pipes_and_folders_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TransportFileError, match="not a regular file"):
        Transport.load(fifo)  # would block forever if it were read
    with pytest.raises(TransportFileError, match="it is a folder"):
        Transport.load(tmp_path)


def test_maps_whose_fields_share_one_tensor_can_be_saved(tmp_path):
    bounds = torch.full((3,), float("inf"))
    zero = torch.zeros(3)
    shared = ModuleMap(torch.ones(3), zero, -bounds, bounds, -bounds, bounds)
    transport = Transport(
        {"x": shared, "y": ModuleMap(zero + 1, zero, zero - 1, zero + 1, zero - 1, zero + 1)},
        "linear",
        "all",
        2,
        2,
    )
    transport.save(tmp_path / "shared.safetensors")
    loaded = Transport.load(tmp_path / "shared.safetensors")
    assert torch.equal(loaded.maps["y"].source_lo, -torch.ones(3))


def test_an_oversized_info_gets_a_clear_error():
    transport = _fitted()
    transport.info = {"notes": "x" * 70_000_000}
    with pytest.raises(ActError, match=r"header is 70\.0 MB.*info.*at most 64 MB"):
        transport.to_bytes()


def test_saved_files_honour_the_umask_and_keep_an_overwritten_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "style.safetensors"
        _fitted().save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        _fitted().save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_names_up_to_the_file_system_limit_can_be_saved(tmp_path):
    path = tmp_path / ("s" * (255 - len(".safetensors")) + ".safetensors")
    _fitted().save(path)
    assert Transport.load(path).sites == _fitted().sites
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_killed_writes_temporary_file_is_cleaned_up_by_a_later_write(tmp_path):
    stale = tmp_path / ".act-deadbeef.tmp"
    fresh = tmp_path / ".act-0123abcd.tmp"  # another save, still being written
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    _fitted().save(tmp_path / "style.safetensors")
    assert not stale.exists() and fresh.exists()
