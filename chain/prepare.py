"""Turn the data section of a config into site datasets, a held-out test set and a proxy set.

Either one dataset is split into K disjoint stratified site fractions (experiments, and demo sites
that each load only their own fraction), or every site has its own data path. The same functions
serve the in-process chain and a federated site, so both see exactly the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import DataSettings
from .data import (
    SYNTHETIC,
    ImageSet,
    ImageSpec,
    SiteData,
    make_site,
    read_labelled,
    read_unlabelled,
    split_parts,
    stratified_split,
)
from .errors import SiteDataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    spec: ImageSpec
    sites: dict[str, SiteData]
    test: ImageSet
    proxy: ImageSet | None


def image_spec(data: DataSettings) -> ImageSpec:
    return ImageSpec(tuple(data.classes), data.image_size, data.channels)


def prepare(data: DataSettings, order: Sequence[str], seed: int, need_proxy: bool) -> Prepared:
    """Load every site's data (train/val split), the test set and, when needed, the proxy set."""
    spec = image_spec(data)
    if data.dataset is not None:
        pool, test = pool_and_test(data, spec, seed)
        parts = split_parts(pool.labels, len(order), seed)
        labelled = {name: pool.subset(idx) for name, idx in zip(order, parts)}
    else:
        labelled = {name: read_labelled(data.sites[name], spec) for name in order}
        assert data.test is not None  # checked by the config loader
        test = read_labelled(data.test, spec, split="test")
    sites = {name: make_site(name, labelled[name], data.val_fraction, seed, site_unlabelled(data, name, spec),
                             data.labelled_fraction) for name in order}
    proxy = load_proxy(data, spec) if need_proxy else None
    return Prepared(spec, sites, test, proxy)


def pool_and_test(data: DataSettings, spec: ImageSpec, seed: int) -> tuple[ImageSet, ImageSet]:
    """The labelled pool that is split across sites, and the held-out test set.

    A .npz keeps its own 'test' split; otherwise ``test_fraction`` of the dataset is held out
    (stratified, deterministic), unless ``data.test`` names a separate test set.
    """
    assert data.dataset is not None
    syn = _synthetic_args(data)
    full = read_labelled(data.dataset, spec, split="train", synthetic_args=syn)
    if data.test is not None:
        return full, read_labelled(data.test, spec, split="test", synthetic_args=syn)
    if data.dataset != SYNTHETIC and Path(data.dataset).suffix == ".npz":
        return full, read_labelled(data.dataset, spec, split="test")
    rest, held = stratified_split(full.labels, data.test_fraction, seed + 7)
    return full.subset(rest), full.subset(held)


def site_fraction(data: DataSettings, order: Sequence[str], site: str, seed: int) -> SiteData:
    """One site's fraction of a dataset split across ``order`` (what a federated demo site loads)."""
    if site not in order:
        raise SiteDataError(f"site {site}: not one of the split's sites {list(order)}")
    spec = image_spec(data)
    pool, _ = pool_and_test(data, spec, seed)
    parts = split_parts(pool.labels, len(order), seed)
    part = pool.subset(parts[list(order).index(site)])
    return make_site(site, part, data.val_fraction, seed, site_unlabelled(data, site, spec), data.labelled_fraction)


def load_proxy(data: DataSettings, spec: ImageSpec) -> ImageSet:
    """The shared proxy set of unlabelled images for logits mode."""
    if data.proxy is None:
        raise SiteDataError("logits mode needs data.proxy, a folder of unlabelled images held by every site")
    n = max(64, data.synthetic.samples // 3)
    return read_unlabelled(data.proxy, spec, synthetic_args=(n, data.synthetic.noise, data.synthetic.seed))


def site_unlabelled(data: DataSettings, site: str, spec: ImageSpec) -> ImageSet | None:
    path = data.unlabelled.get(site)
    if path is None:
        return None
    n = max(64, data.synthetic.samples // 3)
    args = (n, data.synthetic.noise, data.synthetic.seed + 101 * (1 + hash_site(site)))
    return read_unlabelled(path, spec, synthetic_args=args)


def hash_site(site: str) -> int:
    """A stable small integer per site name (Python's hash() is salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(site)) % 9973


def _synthetic_args(data: DataSettings) -> tuple[int, float, int]:
    s = data.synthetic
    return (s.samples, s.noise, s.seed)
