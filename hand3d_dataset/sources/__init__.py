"""Hand3D sources: the `SourceAdapter` protocol and the registry of adapters.

    >>> from hand3d_dataset.sources import get_source
    >>> src = get_source("synth", num_clips=2, seed=0, image_size=64, num_frames=2)  # needs the `sim` extra
    >>> clip = src.load_clip(src.clip_ids()[0])
    >>> clip.frames.shape
    (2, 64, 64, 3)

The protocol (the one place it is written down):

- `name: str` — the registry name, also written to `Clip.source`.
- `clip_ids() -> list[str]` — every clip the source can yield, in a stable order; ids are unique and
  stable across runs and machines, so a resumed or parallel build can skip or split work by id.
- `load_clip(clip_id: str) -> Clip` — builds one validated `Clip` (see `hand3d_dataset.clip`).
  Independent of the order of calls and of other clips (workers call it in any order); the same id
  gives identical arrays. A clip that cannot be built (unreadable file, corrupt values) raises
  `ValueError` naming the clip and the reason; the runner records it as skipped and carries on.
- `skipped: dict[str, str]` (optional) — sequences that failed while the source was listed (sequence →
  reason; they yield no clip id); `hand3d build` counts them in report.json per source
  (`listing_skipped`). The real-dataset adapters share `sources._common.ChunkedSource`.

Adapters are looked up by name with `get_source(name, **kwargs)`; kwargs go to the adapter's
constructor. Modules are imported lazily so that optional dependencies (MuJoCo for `synth`) are only
needed by the source that uses them.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from hand3d_dataset.clip import Clip

__all__ = ["SourceAdapter", "SOURCES", "get_source", "iter_clips"]


@runtime_checkable
class SourceAdapter(Protocol):
    """A source of unified clips; see the module docstring for the contract."""

    name: str

    def clip_ids(self) -> list[str]: ...

    def load_clip(self, clip_id: str) -> Clip: ...


SOURCES: dict[str, str] = {  # registry name → "module:class"
    "synth": "hand3d_dataset.sources.synth:SynthSource",
    "hot3d": "hand3d_dataset.sources.hot3d:Hot3dSource",
    "dexycb": "hand3d_dataset.sources.dexycb:DexYcbSource",
    "h2o": "hand3d_dataset.sources.h2o:H2oSource",
    "arctic": "hand3d_dataset.sources.arctic:ArcticSource",
    "oakink2": "hand3d_dataset.sources.oakink2:OakInk2Source",
    "taco": "hand3d_dataset.sources.taco:TacoSource",
    "fpha": "hand3d_dataset.sources.fpha:FphaSource",
    "egodex": "hand3d_dataset.sources.egodex:EgoDexSource",
    "hoi4d": "hand3d_dataset.sources.hoi4d:Hoi4dSource",
    "hawor": "hand3d_dataset.sources.hawor:HaworSource",
}


def get_source(name: str, **kwargs) -> SourceAdapter:
    """The adapter registered as `name`, constructed with `kwargs`."""
    if name not in SOURCES:
        raise ValueError(f"name: unknown source {name!r}; available: {sorted(SOURCES)}")
    module, cls = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def iter_clips(source: SourceAdapter):
    """Yields every clip of `source` in `clip_ids()` order (convenience for small sources and tests)."""
    for clip_id in source.clip_ids():
        yield source.load_clip(clip_id)
