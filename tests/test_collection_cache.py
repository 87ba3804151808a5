"""The collection cache without ComfyUI: sample files, keys, the size-capped store and the
identities of models (duck-typed fakes of ComfyUI's ModelPatcher)."""

import functools
import importlib
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from comfy_support import PACK, load_pack
from torch import nn


@pytest.fixture(scope="module")
def pack():
    load_pack()
    return SimpleNamespace(
        act=importlib.import_module(f"{PACK}.act"),
        io=importlib.import_module(f"{PACK}.act.samples_io"),
        recording=importlib.import_module(f"{PACK}.act.recording"),
        cache=importlib.import_module(f"{PACK}.nodes.cache"),
        identity=importlib.import_module(f"{PACK}.nodes.identity"),
    )


def make_samples(pack, seed=0, rows=6, causal=False):
    generator = torch.Generator().manual_seed(seed)
    sites = ["diffusion_model.input_blocks.1.1.norm", "clip.layers.0:1"]
    shapes = {site: (rows + index, 4 + index) for index, site in enumerate(sites)}
    sides = [
        {site: torch.randn(shape, generator=generator) for site, shape in shapes.items()}
        for _ in range(2)
    ]
    samples = pack.act.Samples(
        *sides,
        model_class="SD15 UNetModel + SD1ClipModel",
        module_params={sites[0]: {"weight": [4]}},
        info={"source_prompts": ["a cat"], "target_prompts": ["a cat, watercolor"]},
        pooling=pack.recording.Pooling("tokens", 32),
    )
    if causal:
        samples.fitted = samples.fit("linear", "all")
        samples.causal = ("linear", "all")
    return samples


def assert_same_samples(left, right):
    assert left.sites == right.sites and list(left.target) == list(right.target)
    for side in ("source", "target"):
        for site, values in getattr(left, side).items():
            assert torch.equal(values, getattr(right, side)[site]), (side, site)
    for name in ("model_class", "module_params", "causal", "info", "pooling"):
        assert getattr(left, name) == getattr(right, name), name


def test_samples_survive_a_file_round_trip_unchanged(pack):
    samples = make_samples(pack)
    loaded = pack.io.samples_from_bytes(pack.io.samples_to_bytes(samples))
    assert_same_samples(samples, loaded)
    assert loaded.fitted is None
    assert loaded.summary() == samples.summary()


def test_a_causal_collections_fitted_transport_is_kept(pack):
    samples = make_samples(pack, causal=True)
    loaded = pack.io.samples_from_bytes(pack.io.samples_to_bytes(samples))
    assert_same_samples(samples, loaded)
    fitted = loaded.fit("linear", "all")
    assert fitted.sites == samples.fitted.sites
    for site, module_map in samples.fitted.maps.items():
        assert torch.equal(fitted.maps[site].omega, module_map.omega)
        assert torch.equal(fitted.maps[site].beta, module_map.beta)


def test_other_bytes_are_refused_without_unpickling(pack, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(functools.partial(marker.write_text, "yes"))
    transport = make_samples(pack).fit("linear", "all").to_bytes()
    for data, message in ((payload, "not a valid samples file"), (transport, "not a valid")):
        with pytest.raises(pack.act.ActError, match=message):
            pack.io.samples_from_bytes(data, "entry.samples")
    assert not marker.exists()


def test_keys_depend_on_every_value_but_not_on_dict_order(pack):
    key = pack.cache.cache_key
    base = {"prompts": {"source": ["a cat"], "target": ["a cat, ink"]}, "seed": 0, "size": [64, 64]}
    assert key(base) == key(dict(reversed(base.items())))
    assert len(key(base)) == 64
    changed = [
        {**base, "seed": 1},
        {**base, "size": [64, 72]},
        {**base, "prompts": {"source": ["a cat"], "target": ["a cat, oil"]}},
        {**base, "extra": None},
    ]
    assert len({key(base), *map(key, changed)}) == 1 + len(changed)


@pytest.mark.parametrize("value", [torch.ones(2), float("nan"), object()])
def test_keys_take_plain_values_only(pack, value):
    with pytest.raises(pack.act.ActError, match="plain values only"):
        pack.cache.cache_key({"value": value})


def test_a_stored_entry_loads_equal_and_a_missing_one_is_none(pack, tmp_path):
    store = pack.cache.SampleCache(tmp_path / "cache", 10**9)
    samples = make_samples(pack)
    key = pack.cache.cache_key({"n": 1})
    assert store.load(key) is None
    assert store.store(key, samples)
    assert_same_samples(samples, store.load(key))
    assert store.path(key).suffix == ".samples"  # out of Load Transport's .safetensors list
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [store.path(key).name]


def test_a_corrupted_entry_is_a_miss_and_is_deleted(pack, tmp_path):
    store = pack.cache.SampleCache(tmp_path, 10**9)
    key = pack.cache.cache_key({"n": 1})
    store.store(key, make_samples(pack))
    store.path(key).write_bytes(store.path(key).read_bytes()[:100])
    assert store.load(key) is None
    assert not store.path(key).exists()


def test_the_least_recently_used_entries_go_beyond_the_size_cap(pack, tmp_path):
    entry = len(pack.io.samples_to_bytes(make_samples(pack)))
    store = pack.cache.SampleCache(tmp_path, int(2.5 * entry))
    first, second, third = (pack.cache.cache_key({"n": n}) for n in range(3))
    store.store(first, make_samples(pack, seed=1))
    os.utime(store.path(first), ns=(1, 1))  # long ago
    store.store(second, make_samples(pack, seed=2))
    os.utime(store.path(second), ns=(2, 2))
    assert store.load(first) is not None  # used now: `second` is the least recently used
    store.store(third, make_samples(pack, seed=3))
    assert store.load(second) is None
    assert store.load(first) is not None and store.load(third) is not None
    assert sum(path.stat().st_size for path in store.entries()) <= store.max_bytes


def test_an_entry_over_the_cap_is_not_stored_and_evicts_nothing(pack, tmp_path):
    small = make_samples(pack, rows=2)
    store = pack.cache.SampleCache(tmp_path, len(pack.io.samples_to_bytes(small)) + 10)
    kept = pack.cache.cache_key({"n": 0})
    assert store.store(kept, small)
    assert not store.store(pack.cache.cache_key({"n": 1}), make_samples(pack, rows=50))
    assert store.entries() == [store.path(kept)]


def test_clear_deletes_every_entry(pack, tmp_path):
    store = pack.cache.SampleCache(tmp_path, 10**9)
    for n in range(3):
        store.store(pack.cache.cache_key({"n": n}), make_samples(pack))
    assert store.clear() == 3
    assert store.entries() == []


def test_a_key_that_is_not_a_digest_is_refused(pack, tmp_path):
    store = pack.cache.SampleCache(tmp_path, 10**9)
    with pytest.raises(pack.act.ActError, match=r"'\.\./escape'"):
        store.path("../escape")


def test_the_size_cap_comes_from_the_environment(pack):
    limit = pack.cache.size_limit
    assert limit({}) == 2 * 10**9
    assert limit({"ACT_COLLECTION_CACHE_GB": "0.5"}) == 5 * 10**8
    assert limit({"ACT_COLLECTION_CACHE_GB": "0"}) == 0
    for wrong in ("two", "-1", "inf"):
        with pytest.raises(pack.act.ActError, match=f"ACT_COLLECTION_CACHE_GB='{wrong}'"):
            limit({"ACT_COLLECTION_CACHE_GB": wrong})
    assert str(pack.cache.cache_folder("/x", {"ACT_COLLECTION_CACHE_DIR": "/y"})) == "/y"
    assert str(pack.cache.cache_folder("/x", {})) == "/x"


class FakePatcher:
    """The parts of ComfyUI's ModelPatcher that identities read."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.cached_patcher_init = None

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for key, value in patches.items():
            self.patches.setdefault(key, []).append(
                (strength_patch, value, strength_model, None, None)
            )


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def identity(pack, patcher):
    return pack.cache.cache_key({"model": pack.identity.model_identity(patcher)})


def test_equal_models_have_equal_identities_and_other_weights_do_not(pack):
    assert identity(pack, FakePatcher(tiny_net(0))) == identity(pack, FakePatcher(tiny_net(0)))
    assert identity(pack, FakePatcher(tiny_net(0))) != identity(pack, FakePatcher(tiny_net(1)))
    net = tiny_net(0)
    before = identity(pack, FakePatcher(net))
    with torch.no_grad():
        net[2].weight[1, 5] += 1e-3  # one weight of a small tensor: fingerprinted whole
    assert identity(pack, FakePatcher(net)) != before


def test_a_lora_its_strength_and_its_weights_change_the_identity(pack):
    net = tiny_net()
    plain = FakePatcher(net)
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    identities = {identity(pack, plain)}
    for strength, tensors in ((1.0, (up, down)), (0.5, (up, down)), (1.0, (up, down * 2))):
        patched = FakePatcher(net)
        patched.add_patches({"0.weight": ("lora", tensors)}, strength)
        identities.add(identity(pack, patched))
    assert len(identities) == 4


def test_weights_patched_in_place_count_as_their_saved_originals(pack):
    net = tiny_net()
    patcher = FakePatcher(net)
    before = identity(pack, patcher)
    original = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight += 1.0  # what loading a LoRA'd clone does to the shared module
    patcher.backup["0.weight"] = SimpleNamespace(weight=original, inplace_update=False)
    assert identity(pack, patcher) == before


def test_object_patches_and_model_options_are_described_by_content(pack):
    def scaled(factor):
        return lambda x: x * factor

    net = tiny_net()
    keys = set()
    for factor in (2.0, 2.0, 3.0):
        patcher = FakePatcher(net)
        patcher.model_options["transformer_options"]["patches"] = {"attn1_patch": [scaled(factor)]}
        keys.add(identity(pack, patcher))
    assert len(keys) == 2  # the same closure value gives the same identity, another not
    patcher = FakePatcher(net)
    patcher.object_patches["model_sampling"] = nn.Linear(2, 2)
    assert identity(pack, patcher) != identity(pack, FakePatcher(net))


def test_no_memory_address_enters_an_identity(pack):
    class Opaque:
        __slots__ = ()

    described = pack.identity.describe([Opaque(), functools.partial(print, 1)])
    assert "0x" not in repr(described)
    assert described == pack.identity.describe([Opaque(), functools.partial(print, 1)])


def test_a_checkpoint_file_counts_with_its_size_and_time(pack, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    patcher = FakePatcher(tiny_net())
    patcher.cached_patcher_init = (print, (str(path), False), 0)
    (entry,) = pack.identity.checkpoint_files(patcher)
    assert entry[0] == os.path.realpath(path) and entry[1] == len(b"weights")
    before = identity(pack, patcher)
    os.utime(path, ns=(10**18, 10**18))
    assert identity(pack, patcher) != before
    patcher.cached_patcher_init = (print, ([str(path), str(tmp_path / "gone")],))
    assert len(pack.identity.checkpoint_files(patcher)) == 1
