"""Rebuild the embedded default corpus from Debian's `wordnet-base` package (WordNet 3.0).

    python data/wordnet/build.py            # downloads the .deb with apt-get, writes next to this file
    python data/wordnet/build.py --wordnet-dir /usr/share/wordnet   # from an installed wordnet-base

Writes, in BEIR layout:
  corpus.jsonl     one document per synset: {"_id": "n00217014", "title": "destruction, devastation",
                   "text": <the gloss's definition>}; the usage examples are NOT in the corpus
  queries.jsonl    one usage example for a seeded sample of synsets (only examples that contain one of the
                   synset's lemmas, so the query is a real use of the word)
  qrels/test.tsv   query -> the synset whose example it is (score 1)
  qrels/train.tsv  the same for the training queries ("t1", "t2", ..., after the test queries in
                   queries.jsonl): one usage example each of synsets in the corpus that no test query judges,
                   for fine-tuning (`--train-queries`)

The retrieval task is honest: a query is a real sentence that uses a word, written by WordNet's
lexicographers; it is never part of the corpus; the one relevant document is the definition of the sense
used. The word itself matches the titles of all of its senses in the corpus, so ranking the right sense
first needs the rest of the sentence: a small word-sense retrieval task.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
QUOTED = re.compile(r'"([^"]+)"')


def parse_data_file(path: Path, pos: str):
    """Yield (id, lemmas, definition, examples) for every synset line of one WordNet data file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, n_words = fields[0], int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lemmas = [re.sub(r"\((a|p|ip)\)$", "", w) for w in lemmas]  # adjective markers
            gloss = gloss.strip()
            examples = [e.strip() for e in QUOTED.findall(gloss)]
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition.startswith('"'):
                definition = ""
            yield f"{pos}{offset}", lemmas, definition, examples


def uses_a_lemma(example: str, lemmas: list[str]) -> bool:
    return any(re.search(r"\b" + re.escape(lemma), example, re.IGNORECASE) for lemma in lemmas)


def normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def draw_train_queries(synsets: list, in_corpus: set[str], test: list, n: int, seed: int) -> list:
    """(qid, text, synset) for up to n training queries: one usage example each of synsets in the corpus that
    no test query judges. No leak: a test synset is never a training positive, and no training text equals
    a test query (compared lower-cased, punctuation ignored). An example shared by several synsets is left
    out (its label would be ambiguous). A separate RNG, drawn after the corpus and the test split are
    decided, so those stay byte-identical whatever n is."""
    test_synsets = {sid for _, _, sid in test}
    test_texts = {normalized(text) for _, text, _ in test}
    shared = Counter(normalized(e) for s in synsets for e in set(s[3]))
    candidates = [s for s in synsets if s[3] and s[0] in in_corpus and s[0] not in test_synsets]
    rng = random.Random(f"train-{seed}")
    rng.shuffle(candidates)
    train = []
    for sid, lemmas, _, examples in candidates:
        if len(train) == n:
            break
        usable = [e for e in examples if uses_a_lemma(e, lemmas) and len(e.split()) >= 4
                  and shared[normalized(e)] == 1 and normalized(e) not in test_texts]
        if usable:
            train.append((f"t{len(train) + 1}", rng.choice(usable), sid))
    return train


def fetch_wordnet(tmp: Path) -> Path:
    subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True)
    deb = next(tmp.glob("wordnet-base_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
    return tmp / "root/usr/share/wordnet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet-dir", type=Path, help="folder with data.noun etc. (default: apt-get download)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--train-queries", type=int, default=5000, help="training queries (qrels/train.tsv)")
    ap.add_argument("--seed", type=int, default=20061206)
    ap.add_argument("--max-bytes", type=int, default=4_800_000, help="cap on corpus.jsonl size")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wn = args.wordnet_dir or fetch_wordnet(Path(tmp))
        synsets = [s for pos, name in POS_FILES.items() for s in parse_data_file(wn / name, pos)]

    synsets = [s for s in synsets if s[2]]
    rng = random.Random(args.seed)
    candidates = [s for s in synsets if s[3]]
    rng.shuffle(candidates)
    queries = []
    for sid, lemmas, _, examples in candidates:
        text = examples[0]
        if uses_a_lemma(text, lemmas) and len(text.split()) >= 4:
            queries.append((f"q{len(queries) + 1}", text, sid))
        if len(queries) == args.queries:
            break
    # Keep every judged synset; fill the rest of the byte budget with the others in a seeded order.
    judged = {sid for _, _, sid in queries}
    rest = [s for s in synsets if s[0] not in judged]
    rng.shuffle(rest)
    lines, size = [], 0
    for sid, lemmas, definition, _ in [s for s in synsets if s[0] in judged] + rest:
        line = json.dumps({"_id": sid, "title": ", ".join(lemmas), "text": definition}, ensure_ascii=False)
        if size + len(line.encode()) + 1 > args.max_bytes:
            continue
        lines.append((sid, line))
        size += len(line.encode()) + 1
    order = {s[0]: i for i, s in enumerate(synsets)}
    lines.sort(key=lambda x: order[x[0]])
    train = draw_train_queries(synsets, {sid for sid, _ in lines}, queries, args.train_queries, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.jsonl").write_text("".join(line + "\n" for _, line in lines), encoding="utf-8")
    with open(args.out / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text, _ in queries + train:
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    (args.out / "qrels").mkdir(exist_ok=True)
    for split, judged in (("test", queries), ("train", train)):
        with open(args.out / f"qrels/{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, _, sid in judged:
                f.write(f"{qid}\t{sid}\t1\n")
    print(f"{len(lines)} documents ({size / 1e6:.2f} MB) of {len(synsets)} synsets, {len(queries)} test queries, "
          f"{len(train)} training queries")


if __name__ == "__main__":
    main()
