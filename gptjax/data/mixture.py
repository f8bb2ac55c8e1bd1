"""Mixtures: several weighted sources in one run (`data.mixture`, e.g. 70% web text and 30% code).

Each source is prepared into its own token cache, all with one tokenizer: the given one (data.tokenizer, or a
parent's), or one SentencePiece model trained on a sample of every source in proportion to its weight. Each
source keeps its own held-out split (chosen by document hash, as for a single source), so a run reports a
held-out loss per source beside the overall one.

Row r of the batch of step s comes from the source drawn for it from (seed, step) with the weights as
probabilities, and is that source's row r of its own (seed, step) batch: batches stay a pure function of
(seed, step), each process reads only its rows, and over many steps each source's share of rows converges to
its weight (binomial sampling error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from gptjax.config import DataConfig, MixtureSource, write_atomic
from gptjax.data import cache
from gptjax.data.sources import iter_documents
from gptjax.data.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from gptjax.errors import DataError


def source_config(cfg: DataConfig, s: MixtureSource) -> DataConfig:
    """The data config of one mixture source: the run's data settings with that source's corpus."""
    return dataclasses.replace(cfg, source=s.source, paths=s.paths, text_field=s.text_field, separator=s.separator,
                               mixture=())


def _mixture_tokenizer(cfg: DataConfig, vocab_size: int, log) -> Tokenizer:
    """One SentencePiece model for every source: trained on each source's own tokenizer sample, sized by its
    weight, and kept in a directory named by the sources' specs and fingerprints (made once, then reused)."""
    total = sum(s.weight for s in cfg.mixture)
    parts = [(s, source_config(cfg, s)) for s in cfg.mixture]
    corpora = [cache._Corpus(c) for _, c in parts]
    key = hashlib.sha256(json.dumps([[cache._spec(c, vocab_size), k.fingerprint, s.weight]
                                     for (s, c), k in zip(parts, corpora)], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_cache_dir()
    out = root / "data" / f"mixture-v{vocab_size}-{key}"
    if (out / "tokenizer.model").is_file():
        return load_tokenizer(out)
    sample: list[str] = []
    for s, c in parts:
        budget = max(int(cfg.tokenizer_sample_bytes * s.weight / total), 1)
        sample += cache._tokenizer_sample((t for _, t in iter_documents(c)), cfg.val_fraction, budget)
    if not sample:
        raise DataError("the mixture's sources hold no training documents; check data.mixture's paths")
    log(f"data: training one tokenizer for the {len(parts)} sources of the mixture")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.model.partial"
    train_tokenizer(sample, vocab_size, tmp, cfg.num_task_tokens, cfg.tokenizer_sample_bytes)
    write_atomic(out / "tokenizer.model", tmp.read_bytes())
    tmp.unlink()
    return load_tokenizer(out)


def prepare_mixture(cfg: DataConfig, vocab_size: int, *, tokenizer: Tokenizer | None = None,
                    log=print) -> list[dict]:
    """Prepare every source of `cfg.mixture` with one tokenizer; [{"name", "weight", "data_dir"}] in order."""
    tok = tokenizer or _mixture_tokenizer(cfg, vocab_size, log)
    out = []
    for s in cfg.mixture:
        log(f"data: mixture source '{s.name}' (weight {s.weight:g})")
        d = cache.prepare(source_config(cfg, s), vocab_size, tokenizer=tok, log=log)
        out.append({"name": s.name, "weight": s.weight, "data_dir": str(Path(d).absolute())})
    return out


class Mixture:
    """The token caches of a mixture's sources, read as one: the interface of `TokenData` (batch, eval_windows,
    tokens, manifest, tokenizer), with `parts` for the per-source held-out losses."""

    def __init__(self, entries: list[dict]):
        self.names = [e["name"] for e in entries]
        w = np.array([float(e["weight"]) for e in entries])
        self.weights = w / w.sum()
        self.parts = [cache.TokenData(e["data_dir"]) for e in entries]
        shas = {p.manifest["tokenizer"]["sha256"] for p in self.parts}
        if len(shas) > 1:
            raise DataError("the mixture's token caches were made with different tokenizers; delete them and rerun")
        self.path = self.parts[0].path
        self.tokenizer = self.parts[0].tokenizer
        first = self.parts[0].manifest
        self.manifest = {**first,
                         "tokens": {sp: sum(p.tokens(sp) for p in self.parts) for sp in ("train", "val")},
                         "bytes": {"val": sum(p.manifest["bytes"]["val"] for p in self.parts)},
                         "mixture": entries}
        self.shards = {sp: [s for p in self.parts for s in p.shards[sp]] for sp in ("train", "val")}

    def tokens(self, split: str) -> int:
        return int(self.manifest["tokens"][split])

    def bytes_per_token(self, split: str = "val") -> float:
        return self.manifest["bytes"][split] / self.manifest["tokens"][split]

    def sources(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Which source each row of the global batch of `step` comes from."""
        return np.random.default_rng([seed, step, 4]).choice(len(self.parts), size=batch_size, p=self.weights)

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, *, split: str = "train",
              process_index: int = 0, process_count: int = 1, rows: np.ndarray | None = None,
              sampling: str = "random") -> np.ndarray:
        if sampling != "random":
            raise DataError("data.sampling=epoch is for a single source; a mixture draws its rows at random "
                            "(set data.sampling=random)")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by {process_count} processes")
        per = batch_size // process_count
        picked = np.arange(process_index * per, (process_index + 1) * per) if rows is None else np.asarray(rows)
        which = self.sources(seed, step, batch_size)[picked]
        out = np.empty((len(picked), seq_len + 1), np.int32)
        for c, part in enumerate(self.parts):
            sel = which == c
            if sel.any():  # each source's own batch of this step, at the rows it was drawn for
                out[sel] = part.batch(seed * 1009 + c + 1, step, batch_size, seq_len, split=split, rows=picked[sel])
        return out

    def eval_windows(self, tokens: np.ndarray | None = None, *, split: str = "val", seq_len: int,
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        streams = [np.asarray(tokens)] if tokens is not None else self.shards[split]
        yield from cache.windows(streams, seq_len, batch_size)
