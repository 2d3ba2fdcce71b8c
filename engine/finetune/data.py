"""Fine-tuning training data: files -> `TrainingData` -> query groups -> token batches.

    data = load_training_data("train.jsonl")            # or a BEIR folder, a .gz file, a list of them
    groups = GroupDataset(data, group_size=8, seed=0)   # groups[epoch * len(groups) + i]
    loader = DataLoader(groups, batch_sampler=..., collate_fn=PairCollator(tokenizer_path))

Formats (`fmt`; "auto" picks `beir` for a folder, otherwise looks at the file's first JSON object):
  flag      FlagEmbedding jsonl: {"query", "pos": [str], "neg": [str], "pos_scores"?, "neg_scores"?}
  tevatron  Tevatron's legacy jsonl: {"query" | "query_text", "positive_passages": [{"docid", "title", "text",
            "score"?}], "negative_passages": [...]}; a passage's text is "title text"
  beir      a BEIR folder: each query judged in qrels/<split>.tsv with its score > 0 documents as positives;
            no negatives, so groups are filled with random corpus documents
Other keys are ignored. A bad line is reported as file:line and skipped (`strict` stops at the first one).
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

FORMATS = ("auto", "beir", "flag", "tevatron")
MAX_REPORTED = 10
# Domain separators of the two RNG streams: what is fixed for a query, what changes every epoch.
_PER_QUERY, _PER_EPOCH = 0x51A7, 0xE70C


class FinetuneDataError(ValueError):
    """Unusable training data (a bad line under strict, no usable query, an unknown format): user-facing."""


class _BadLine(Exception):
    """Why one line is skipped."""


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainingData:
    """Parallel per-query lists. `corpus` is the pool random negatives are drawn from: the whole corpus of a
    BEIR folder, every positive and negative text of a jsonl file; deduplicated, first-seen order."""
    queries: list[str]
    positives: list[list[str]]
    negatives: list[list[str]]
    pos_scores: list[list[float]] | None  # teacher scores, parallel to positives; None when the data carry none
    neg_scores: list[list[float]] | None
    corpus: list[str]
    sources: list[str]
    bad_lines: int = 0
    query_ids: list[str] | None = None  # BEIR only: for leak checks
    positive_ids: list[list[str]] | None = None


@dataclass
class _Example:
    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None
    neg_scores: list[float] | None
    where: str  # "file:line"
    source: int
    query_id: str | None = None
    pos_ids: list[str] | None = None


class _Report:
    """Counts bad lines per source and shows the first few; under strict the first one is an error."""

    def __init__(self, strict: bool, log: Callable[[str], None]):
        self.strict, self.log, self.per_source, self.first = strict, log, Counter(), None

    def bad(self, source: int, message: str) -> None:
        if self.strict:
            raise FinetuneDataError(message)
        self.per_source[source] += 1
        if sum(self.per_source.values()) <= MAX_REPORTED:
            self.log(f"[data] skipped {message}")

    def check_scores(self, e: _Example) -> None:
        """Under strict, teacher scores are all or nothing from the first line on (otherwise see
        `_one_kind_of_lines`)."""
        self.first = self.first or e
        if self.strict and (e.pos_scores is None) != (self.first.pos_scores is None):
            has = "has them" if self.first.pos_scores is not None else "has none"
            self.bad(e.source, f"{e.where}: teacher scores in some lines only ({self.first.where} {has})")


# -- one line of each jsonl format ---------------------------------------------------------------------

def _query(rec: dict, keys: Sequence[str]) -> str:
    key = next((k for k in keys if k in rec), None)
    if key is None:
        raise _BadLine(f'no "{keys[0]}"')
    if not isinstance(rec[key], str) or not rec[key].strip():
        raise _BadLine(f'"{key}" must be a non-empty string')
    return rec[key]


def _texts(rec: dict, key: str) -> list[str]:
    value = rec.get(key)
    if value is None and key == "neg":
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _BadLine(f'"{key}" must be a list of strings' if key in rec else f'no "{key}"')
    if any(not t.strip() for t in value):
        raise _BadLine(f'"{key}" holds an empty text')
    return value


def _scores(value, what: str, n: int) -> list[float]:
    if not isinstance(value, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in value):
        raise _BadLine(f"{what} must be a list of finite numbers")
    if len(value) != n:
        raise _BadLine(f"{what} has {len(value)} scores for {n} texts")
    return [float(s) for s in value]


def _group(query: str, pos: list[str], neg: list[str], pos_scores, neg_scores, names: tuple[str, str]) -> tuple:
    """One line's fields, checked together: a positive, and teacher scores for all texts or none."""
    if not pos:
        raise _BadLine("no positive")
    if pos_scores is None and neg_scores is None:
        return query, pos, neg, None, None
    if pos_scores is None or (neg_scores is None and neg):
        raise _BadLine(f"teacher scores for the {'negatives' if pos_scores is None else 'positives'} only")
    return query, pos, neg, _scores(pos_scores, names[0], len(pos)), _scores(neg_scores or [], names[1], len(neg))


def _parse_flag(rec: dict) -> tuple:
    return _group(_query(rec, ("query",)), _texts(rec, "pos"), _texts(rec, "neg"), rec.get("pos_scores"),
                  rec.get("neg_scores"), ('"pos_scores"', '"neg_scores"'))


def _passages(rec: dict, key: str) -> tuple[list[str], list | None]:
    """Texts ("title text") and raw scores (None when no passage has one) of a Tevatron passage list."""
    value = rec.get(key)
    if value is None and key == "negative_passages":
        value = []
    if not isinstance(value, list):
        raise _BadLine(f'"{key}" must be a list of passages' if key in rec else f'no "{key}"')
    texts, scores = [], []
    for j, p in enumerate(value):
        if not isinstance(p, dict):
            raise _BadLine(f"{key}[{j}] is not an object")
        text, title = p.get("text"), p.get("title")
        if not isinstance(text, str) or (title is not None and not isinstance(title, str)):
            raise _BadLine(f'{key}[{j}]: "text" (and "title") must be strings')
        text = f"{title} {text}".strip() if title else text
        if not text.strip():
            raise _BadLine(f"{key}[{j}] has an empty text")
        texts.append(text)
        if "score" in p:
            scores.append(p["score"])
    if 0 < len(scores) < len(value):
        raise _BadLine(f'only {len(scores)} of {len(value)} {key} carry a "score"')
    return texts, scores or None


def _parse_tevatron(rec: dict) -> tuple:
    (pos, pos_scores), (neg, neg_scores) = _passages(rec, "positive_passages"), _passages(rec, "negative_passages")
    return _group(_query(rec, ("query", "query_text")), pos, neg, pos_scores, neg_scores,
                  ('positive_passages "score"', 'negative_passages "score"'))


PARSERS = {"flag": _parse_flag, "tevatron": _parse_tevatron}


# -- files ---------------------------------------------------------------------------------------------

def _records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, the JSON object, or why the line is not one) for each non-blank line; `.gz` unpacked."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield line_no, f"not valid JSON ({e})"
                continue
            yield line_no, rec if isinstance(rec, dict) else "not a JSON object"


def _detect(path: Path) -> str:
    for _, rec in _records(path):
        if isinstance(rec, dict):
            if "pos" in rec:
                return "flag"
            if "positive_passages" in rec:
                return "tevatron"
            hint = ("; Tevatron's id-based format (positive_document_ids + a corpus) is not read: use its "
                    "legacy format with the texts inline" if "positive_document_ids" in rec else "")
            raise FinetuneDataError(
                f"{path}: cannot tell the format from its first record (keys: {', '.join(sorted(rec)[:8])}): "
                f'expected FlagEmbedding {{"query", "pos", "neg"}} or Tevatron {{"query", "positive_passages"}}'
                f"{hint}")
    raise FinetuneDataError(f"{path}: no JSON object on any line")


def _load_jsonl(path: Path, fmt: str, source: int, report: _Report) -> list[_Example]:
    parse, out = PARSERS[_detect(path) if fmt == "auto" else fmt], []
    try:
        for line_no, rec in _records(path):
            where = f"{path}:{line_no}"
            try:
                if isinstance(rec, str):
                    raise _BadLine(rec)
                out.append(_Example(*parse(rec), where=where, source=source))
                report.check_scores(out[-1])
            except _BadLine as e:
                report.bad(source, f"{where}: {e}")
    except (OSError, EOFError) as e:  # unreadable file, truncated or corrupt .gz
        raise FinetuneDataError(f"{path}: cannot read ({e})") from None
    return out


def _load_beir(folder: Path, split: str, source: int, report: _Report) -> tuple[list[_Example], list[str]]:
    """Examples and the corpus texts, through `dupmae eval`'s reader (same checks, same title joining)."""
    from ..evaluate import EvalError, load_beir

    try:
        beir = load_beir(folder, split, skip_invalid=True)
    except EvalError as e:
        raise FinetuneDataError(str(e)) from None
    for problem in beir.problems:  # already "file:line: reason"
        report.bad(source, problem)
    text = dict(zip(beir.corpus_ids, beir.corpus_texts))
    where = f"{folder / 'qrels' / (split + '.tsv')}"
    out = []
    for qid, query in zip(beir.query_ids, beir.query_texts):
        ids = [d for d, rel in beir.qrels[qid].items() if rel > 0 and text[d].strip()]
        if not ids:
            report.bad(source, f"{where}: query {qid!r}: its relevant documents have empty texts")
            continue
        out.append(_Example(query, [text[d] for d in ids], [], None, None, where, source, qid, ids))
        report.check_scores(out[-1])
    return out, beir.corpus_texts


def load_training_data(path: str | Path | Sequence[str | Path], fmt: str = "auto", split: str = "train",
                       strict: bool = False, log: Callable[[str], None] = print_to_stderr) -> TrainingData:
    """Read one or several sources (concatenated). Bad lines are counted, the first few shown through `log`,
    and skipped; `strict` raises `FinetuneDataError("file:line: reason")` at the first one instead."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise FinetuneDataError("no training data given")
    if fmt not in FORMATS:
        raise FinetuneDataError(f"unknown training data format {fmt!r}: expected one of {', '.join(FORMATS)}")
    report, examples, corpora = _Report(strict, log), [], {}
    for source, p in enumerate(paths):
        if p.is_dir() and fmt in ("auto", "beir"):
            found, corpora[source] = _load_beir(p, split, source, report)
        elif p.is_file() and fmt != "beir":
            found = _load_jsonl(p, fmt, source, report)
        else:
            what = "no such file or folder" if not p.exists() else f"not a {'folder' if fmt == 'beir' else 'file'}"
            raise FinetuneDataError(f"{p}: {what} (training data, format {fmt})")
        examples += found
    examples = _one_kind_of_lines(examples, report)
    dropped = 0
    for e in examples:  # a negative equal to a positive would teach the model to push the answer away
        pos = set(e.pos)
        keep = [j for j, t in enumerate(e.neg) if t not in pos]
        if len(keep) < len(e.neg):
            dropped += len(e.neg) - len(keep)
            e.neg = [e.neg[j] for j in keep]
            e.neg_scores = None if e.neg_scores is None else [e.neg_scores[j] for j in keep]
    if dropped:
        log(f"[data] dropped {dropped:,} negative(s) equal to one of their query's positives")
    for source, p in enumerate(paths):
        n = sum(e.source == source for e in examples)
        log(f"[data] {n:,} training queries from {p} ({report.per_source[source]:,} bad lines skipped)")
    if not examples:
        raise FinetuneDataError(f"no usable training query in {', '.join(map(str, paths))} (format {fmt}, "
                                f"{sum(report.per_source.values()):,} bad lines)")
    texts: dict[int, list[str]] = {source: list(corpus) for source, corpus in corpora.items()}
    for e in examples:
        if e.source not in corpora:
            texts.setdefault(e.source, []).extend(e.pos + e.neg)
    pool = [t for source in sorted(texts) for t in texts[source]]
    scored, beir = examples[0].pos_scores is not None, all(e.query_id is not None for e in examples)
    return TrainingData(
        queries=[e.query for e in examples], positives=[e.pos for e in examples],
        negatives=[e.neg for e in examples],
        pos_scores=[e.pos_scores for e in examples] if scored else None,
        neg_scores=[e.neg_scores for e in examples] if scored else None,
        corpus=[t for t in dict.fromkeys(pool) if t.strip()], sources=[str(p) for p in paths],
        bad_lines=sum(report.per_source.values()),
        query_ids=[e.query_id for e in examples] if beir else None,
        positive_ids=[e.pos_ids for e in examples] if beir else None)


def _one_kind_of_lines(examples: list[_Example], report: _Report) -> list[_Example]:
    """Teacher scores are all or nothing: when only some lines carry them, the smaller group is skipped."""
    scored = sum(e.pos_scores is not None for e in examples)
    if scored in (0, len(examples)):
        return examples
    keep_scored = 2 * scored >= len(examples)
    reason = ("no teacher scores, while most lines carry them" if keep_scored
              else "teacher scores, while most lines carry none")
    for e in examples:
        if (e.pos_scores is not None) != keep_scored:
            report.bad(e.source, f"{e.where}: {reason}")
    return [e for e in examples if (e.pos_scores is not None) == keep_scored]


# -- groups --------------------------------------------------------------------------------------------

class GroupDataset(torch.utils.data.Dataset):
    """Item `epoch * len(self) + i` is query i's group in that epoch: [one positive, group_size - 1 negatives].

    A pure function of (seed, epoch, i), so resuming, changing the world size or re-reading an item gives
    the same group (Tevatron's scheme, made reproducible: numpy generators seeded from the integers, never
    `hash()` or the global `random`). Per query, fixed for the run: an offset h and a shuffle of its
    negatives. Per epoch: positive (h + epoch) % n_pos, the negatives' window moved by epoch * (G - 1); a
    query short of negatives is topped up with random corpus texts, never one of its positives.
    """

    def __init__(self, data: TrainingData, group_size: int, seed: int):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.data, self.group_size, self.seed = data, group_size, seed
        short = [i for i, negs in enumerate(data.negatives) if len(negs) < group_size - 1]
        if short and data.pos_scores is not None:  # random negatives have no teacher score
            raise FinetuneDataError(
                f"the training data carry teacher scores, but {len(short):,} queries have fewer than "
                f"group_size - 1 = {group_size - 1} negatives (query {short[0]}: {len(data.negatives[short[0]])}"
                f"), and random negatives have no score: lower data.group_size or add negatives")
        if short and not data.corpus:
            raise FinetuneDataError("no corpus to draw random negatives from")

    def __len__(self) -> int:
        return len(self.data.queries)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *key])))

    def __getitem__(self, key: int) -> dict:
        epoch, i = divmod(int(key), len(self))
        d, n_neg = self.data, self.group_size - 1
        fixed = self._rng(i, _PER_QUERY)
        h = int(fixed.integers(1 << 31))
        p = (h + epoch) % len(d.positives[i])
        passages = [d.positives[i][p]]
        scores = None if d.pos_scores is None else [d.pos_scores[i][p]]
        negs = d.negatives[i]
        if n_neg and negs:
            order = fixed.permutation(len(negs))
            chosen = [int(order[(epoch * n_neg + k) % len(negs)]) for k in range(min(n_neg, len(negs)))]
            passages += [negs[j] for j in chosen]
            if scores is not None:
                scores += [d.neg_scores[i][j] for j in chosen]
        if len(passages) < self.group_size:
            passages += self._random_negatives(self._rng(epoch, i, _PER_EPOCH), i, set(passages),
                                               self.group_size - len(passages))
        return {"query": d.queries[i], "passages": passages, "teacher_scores": scores}

    def _random_negatives(self, rng: np.random.Generator, i: int, taken: set[str], k: int) -> list[str]:
        """k corpus texts, none a positive of query i, distinct from the group where the pool allows.
        Rejection sampling: a real pool is large next to one query's positives and group."""
        corpus, positives, out = self.data.corpus, set(self.data.positives[i]), []
        seen = positives | taken
        for _ in range(20 * k + 100):
            if len(out) == k:
                return out
            text = corpus[int(rng.integers(len(corpus)))]
            if text not in seen:
                out.append(text)
                seen.add(text)
        allowed = [t for t in corpus if t not in positives]  # a tiny pool: repeats are unavoidable
        if not allowed:
            raise FinetuneDataError(f"query {i} ({self.data.queries[i][:60]!r}): every text of the corpus is one "
                                    "of its positives, no random negative to draw")
        return out + [allowed[int(j)] for j in rng.integers(len(allowed), size=k - len(out))]


# -- batches -------------------------------------------------------------------------------------------

class PairCollator:
    """Groups -> tensors: queries (B x Lq), passages (B*G x Lp; item i's at rows i*G..(i+1)*G-1, positive
    first), and `teacher_scores` (B x G) when every item has them. Padded to the batch's longest, rounded
    up to `pad_to_multiple_of`. The tokenizer is loaded on first use and not pickled, so the collator is
    cheap to send to DataLoader workers."""

    def __init__(self, tokenizer_path: str, query_max_len: int = 64, passage_max_len: int = 256,
                 pad_to_multiple_of: int = 8):
        self.tokenizer_path = str(tokenizer_path)
        self.query_max_len, self.passage_max_len = query_max_len, passage_max_len
        self.pad_to_multiple_of = max(1, pad_to_multiple_of or 1)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from dupmae.data_pipeline.tokenizer import load_fast_tokenizer

            self._tokenizer = load_fast_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def _encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded by hand: `transformers` refuses a max length that is not a multiple of the padding."""
        rows = self.tokenizer(texts, truncation=True, max_length=max_len, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]
        m = self.pad_to_multiple_of
        width = -(-max(map(len, rows)) // m) * m
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        return ids, mask

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        g = len(items[0]["passages"])
        if any(len(it["passages"]) != g for it in items):
            raise ValueError("every item of a batch must have the same number of passages")
        q_ids, q_mask = self._encode([it["query"] for it in items], self.query_max_len)
        p_ids, p_mask = self._encode([t for it in items for t in it["passages"]], self.passage_max_len)
        batch = {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids, "p_attention_mask": p_mask}
        if all(it.get("teacher_scores") is not None for it in items):
            batch["teacher_scores"] = torch.tensor([it["teacher_scores"] for it in items], dtype=torch.float32)
        return batch
