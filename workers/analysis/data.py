"""The data behind the analyse, steer and publish stages: the analysed token pairs streamed in corpus order, token
and document look-ups in the activation shards, the trained crosscoder, the JSON forms of per-feature statistics
that a later stage re-ranks from (the report is assembled in ``workers/report/build.py``).

Memory stays bounded whatever the corpus: the paired stream holds one shard of model A and at most two of model
B, and a look-up loads one shard at a time and keeps only the documents it was asked about.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from dfc.analysis import features as dfc_features
from dfc.analysis.features import PairedTokens
from dfc.crosscoder import CONFIG_NAME, WEIGHTS_NAME, Crosscoder
from dfc.metrics import LatentScaling
from workers.activations.loading import trusted_models_from_env
from workers.activations.pairing import ShardedPairs, _shard_starts, load_pairs
from workers.activations.shards import ShardReader
from workers.storage import ObjectStore

MAX_ANALYSIS_PAIRS = 200_000
"""At most this many token pairs are analysed: plenty for statistics and top contexts, cheap at any corpus size."""
ANALYSIS_BATCH = 1024
"""Pairs per batch: bounds the dense ``batch × F`` encoder scores (0.5 GB at the paper's F = 131,072)."""


class AnalysedPairs(NamedTuple):
    """The pairs an analysis reads, in corpus order: global token indices into each model's shards."""

    a: Tensor
    b: Tensor
    n_heldout: int
    n_train: int
    """Training pairs added in front of the held-out ones because the held-out tail alone was short."""


def select_pairs(store: ObjectStore, aligned: dict[str, Any], limit: int = MAX_ANALYSIS_PAIRS) -> AnalysedPairs:
    """The held-out pairs, preceded by the tail of the training pairs up to ``limit`` in all.

    Both parts are contiguous in corpus order (the held-out pairs are the corpus' tail), so the result is the
    last ``limit`` pairs of the corpus: whole documents, except perhaps the first.
    """
    held_a, held_b = load_pairs(store, aligned["heldout_key"])
    held_a, held_b = held_a[:limit], held_b[:limit]
    room = limit - len(held_a)
    train_a = train_b = torch.empty(0, dtype=torch.long)
    if room > 0:  # only when the corpus is small (< ~4M pairs), so the whole training index is small too
        train_a, train_b = load_pairs(store, aligned["train_key"])
        train_a, train_b = train_a[max(0, len(train_a) - room) :], train_b[max(0, len(train_b) - room) :]
    a, b = torch.cat([train_a, held_a]).long(), torch.cat([train_b, held_b]).long()
    order = torch.argsort(a, stable=True)  # alignment emits pairs in corpus order; sorting makes it a guarantee
    return AnalysedPairs(a[order], b[order], len(held_a), len(train_a))


class OrderedPairs:
    """Iterable of :class:`PairedTokens` batches in corpus order: raw activations, doc ids, global token indices.

    ``position_a``/``position_b`` are the pairs' *global* token indices into each model's shards, so a record
    found by a scan can be looked up again (:func:`locate_tokens`).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix_a: str,
        prefix_b: str,
        pairs_a: Tensor,
        pairs_b: Tensor,
        *,
        batch_size: int = ANALYSIS_BATCH,
        verify: bool = True,
    ) -> None:
        if len(pairs_a) != len(pairs_b) or len(pairs_a) == 0:
            raise ValueError(f"need equally many pairs for both models, got {len(pairs_a)} and {len(pairs_b)}")
        self.index = ShardedPairs(store, prefix_a, prefix_b, pairs_a, pairs_b, verify=verify, b_cache_shards=2)
        self.reader_a, self.reader_b = self.index.reader_a, self.index.reader_b
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Number of batches one iteration yields."""
        return sum(math.ceil(len(mine) / self.batch_size) for mine in self.index.by_shard)

    @property
    def n_pairs(self) -> int:
        return len(self.index.pairs_a)

    def __iter__(self) -> Iterator[PairedTokens]:
        pairs_a, pairs_b = self.index.pairs_a, self.index.pairs_b
        for i in range(len(self.index.by_shard)):  # shard order is corpus order
            rows = self.index.rows(i)
            if rows is None:
                continue
            for s in range(0, len(rows.pairs), self.batch_size):
                e, mine = s + self.batch_size, rows.pairs[s : s + self.batch_size]
                x_a, x_b = rows.x_a[s:e].float(), rows.x_b[s:e].float()
                yield PairedTokens(x_a, x_b, rows.doc_ids[s:e], pairs_a[mine], pairs_b[mine])


@dataclass(frozen=True)
class LocatedToken:
    """Where a global token index lies: its document, its position there, and the document's tokens."""

    doc_id: int
    position: int
    """Index of the token within its document's token ids."""
    token_ids: list[int]
    """The whole (stored, possibly truncated) document's token ids."""
    activations: Tensor | None = None
    """The document's raw activations ``(tokens, d)``, when asked for."""


def locate_tokens(
    store: ObjectStore, prefix: str, indices: Iterable[int], *, with_activations: bool = False
) -> dict[int, LocatedToken]:
    """Look up global token indices of one model's shards, loading each shard that holds one exactly once."""
    reader = ShardReader(store, prefix)
    starts = torch.tensor([*_shard_starts(reader), reader.manifest.n_tokens])
    wanted = torch.tensor(sorted({int(i) for i in indices}), dtype=torch.long)
    if len(wanted) and (int(wanted[0]) < 0 or int(wanted[-1]) >= reader.manifest.n_tokens):
        raise IndexError(f"token indices outside the {reader.manifest.n_tokens} tokens under {prefix}")
    shard_of = torch.searchsorted(starts, wanted, right=True) - 1
    found: dict[int, LocatedToken] = {}
    for i in torch.unique(shard_of).tolist():
        shard = reader.load(i)
        docs = shard.doc_ids
        cached: dict[int, tuple[int, list[int], Tensor | None]] = {}
        for g in wanted[shard_of == i].tolist():
            row = g - int(starts[i])
            doc = int(docs[row])
            if doc not in cached:
                rows = (docs == doc).nonzero().squeeze(1)  # documents are whole and contiguous within a shard
                acts = shard.activations[rows].float() if with_activations else None
                cached[doc] = (int(rows[0]), shard.token_ids[rows].tolist(), acts)
            first, ids, acts = cached[doc]
            found[g] = LocatedToken(doc, row - first, ids, acts)
    return found


def load_crosscoder(store: ObjectStore, final_prefix: str, local: Path, device: str = "cpu") -> Crosscoder:
    """Download the trained crosscoder (safetensors + config.json) and load it for inference."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        store.download_file(f"{final_prefix.rstrip('/')}/{name}", local / name)
    return Crosscoder.from_pretrained(local, device=device).eval()


class TrainedRun(NamedTuple):
    """One crosscoder of an audit's seed ensemble, loaded."""

    run: int
    """0-based place in the ensemble."""
    seed: int
    """Its training seed."""
    crosscoder: Crosscoder


def trained_runs(trained: dict[str, Any]) -> list[dict[str, Any]]:
    """The train manifest's runs (``run``, ``seed``, ``final_prefix``…); a one-seed audit of any version has one."""
    return trained.get("runs") or [{"run": 0, "seed": trained["seed"], "final_prefix": trained["final_prefix"]}]


def load_runs(store: ObjectStore, trained: dict[str, Any], local: Path, device: str = "cpu") -> list[TrainedRun]:
    """Every crosscoder of the audit's ensemble, in run order."""
    return [
        TrainedRun(r["run"], r["seed"], load_crosscoder(store, r["final_prefix"], local / f"seed-{r['run']}", device))
        for r in trained_runs(trained)
    ]


def feature_key(run: int, feature: int, n_features: int) -> int:
    """One integer naming feature ``feature`` of run ``run`` across an ensemble (run 0's keys are its features)."""
    return run * n_features + feature


def split_key(key: int, n_features: int) -> tuple[int, int]:
    """The ``(run, feature)`` an ensemble key names."""
    return divmod(int(key), n_features)


def merge_candidates(parts: Sequence[tuple[Sequence[int], dict[str, Any]]]) -> dict[str, Any]:
    """Candidates of several runs (each ``candidates_to_json``) as one, their features renamed to the given keys."""
    merged: dict[str, Any] = {}
    for keys, data in parts:
        for name, values in data.items():
            if name == "tokens":
                merged["tokens"] = values
            elif name == "features":
                merged.setdefault("features", []).extend(int(k) for k in keys)
            else:
                merged.setdefault(name, []).extend(values)
    if merged and not merged.get("features"):
        merged["features"] = []
    return merged


def load_revision(extracted: dict[str, Any]) -> str | None:
    """The revision to load a model at: its pinned commit, or None for a local folder (keyed ``local-…``)."""
    return None if Path(extracted["model_id"]).is_dir() else extracted["revision"]


def load_tokenizer(extracted: dict[str, Any]) -> Any:
    """The model's tokenizer alone, at the revision its activations came from (no weights are read)."""
    model_id = extracted["model_id"]
    return AutoTokenizer.from_pretrained(
        model_id, revision=load_revision(extracted), trust_remote_code=model_id in trusted_models_from_env()
    )


def architecture_name(extracted: dict[str, Any]) -> str:
    """The model's architecture class name from its config (no weights are read)."""
    model_id = extracted["model_id"]
    config = AutoConfig.from_pretrained(
        model_id, revision=load_revision(extracted), trust_remote_code=model_id in trusted_models_from_env()
    )
    return (getattr(config, "architectures", None) or [type(config).__name__])[0]


def finite(value: float | Tensor | None) -> float | None:
    """A plain float, or None where it is missing or not finite (JSON cannot carry NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _column(values: Sequence[float | None]) -> Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def candidates_to_json(features: Sequence[int], stats: dfc_features.FeatureStats, ls: LatentScaling) -> dict[str, Any]:
    """Per-feature statistics and Latent Scaling of ranking candidates, enough to rank them again later."""
    rows = [stats.index(f) for f in features]
    ls_rows = {int(f): i for i, f in enumerate(ls.features.tolist())}
    at = [ls_rows[int(f)] for f in features]
    out: dict[str, Any] = {"features": [int(f) for f in features], "tokens": stats.tokens}
    for name in ("count", "sum", "max", "variance_share_a", "variance_share_b"):
        out[name] = [finite(v) if name != "count" else int(v) for v in getattr(stats, name)[rows].tolist()]
    for name in ("beta_r_a", "beta_r_b", "beta_eps_a", "beta_eps_b", "nu_r", "nu_eps"):
        out[name] = [finite(v) for v in getattr(ls, name)[at].tolist()]
    out["owner"] = [int(v) for v in ls.owner[at].tolist()]
    if ls.same_space is not None:
        out["same_space"] = [bool(v) for v in ls.same_space[at].tolist()]
    return out


def candidates_from_json(data: dict[str, Any]) -> tuple[list[int], dfc_features.FeatureStats, LatentScaling]:
    """Inverse of :func:`candidates_to_json`: the features, their statistics and Latent Scaling."""
    feats = torch.tensor(data["features"], dtype=torch.long)
    stats = dfc_features.FeatureStats(
        features=feats,
        tokens=int(data["tokens"]),
        count=torch.tensor(data["count"], dtype=torch.long),
        sum=_column(data["sum"]),
        max=_column(data["max"]),
        variance_share_a=_column(data["variance_share_a"]),
        variance_share_b=_column(data["variance_share_b"]),
    )
    ls = LatentScaling(
        feats,
        *(_column(data[name]).float() for name in ("beta_r_a", "beta_r_b", "beta_eps_a", "beta_eps_b")),
        nu_r=_column(data["nu_r"]).float(),
        nu_eps=_column(data["nu_eps"]).float(),
        owner=torch.tensor(data["owner"], dtype=torch.long),
        # Absent in candidates written before cross-space thresholds existed: judged as same-space then.
        same_space=torch.tensor(data["same_space"], dtype=torch.bool) if "same_space" in data else None,
    )
    return data["features"], stats, ls
