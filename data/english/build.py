"""Build a general English pre-training corpus from packages that install offline (Debian's apt and PyPI).

    python data/english/build.py                          # all sources -> work/english/
    python data/english/build.py --sources wikipedia,gcide --max-mb 20 --out work/english-20mb
    python data/english/build.py --extra ../shared/data/scifact --extra cranfield=../shared/data/cranfield/corpus.jsonl

Sources (each fetched once into `--cache`, default work/cache/english/, so reruns need no network):

  python-docs  Debian `python3.11-doc` (`--python-doc`): the Python 3.11 documentation as HTML (tutorial, library and language
               reference, HOWTOs, FAQs). Main content only: navigation, sidebars, scripts, code blocks and API
               signatures are left out. License: PSF License Version 2.
  gcide        Debian `dict-gcide`: GCIDE, the Collaborative International Dictionary of English (Webster's
               Revised Unabridged Dictionary of 1913 + WordNet 1.5 + later additions), dictd format. Each
               entry becomes "headword, part of speech. definitions"; pronunciations, etymologies, source
               tags ("[1913 Webster]"), synonym lists and quotation authors are left out. License: GPL-2+.
  wordnet      Debian `wordnet-base` (WordNet 3.0): every synset as "lemmas: definition; "usage examples"".
               License: WordNet 3.0 license (BSD-style; the notice is in licenses/wordnet.txt of the output).
  perl-docs    Debian `perl-doc`: the Perl 5 manual pages (perlintro, perlfaq*, perlfunc, perlre, perl*delta,
               ...) in POD. Headings, items and text paragraphs are kept with their formatting codes
               (B<>, C<>, L<>, E<>) reduced to text; indented (code) paragraphs and =for/=begin blocks are left
               out. License: GPL-1+ or Artistic.
  wikipedia    The English Wikipedia sample among gensim's test files (the PyPI wheel, read as a zip; gensim
               is never installed): `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302
               -shortened.bz2`, 106 articles of a 2016 dump (redirects skipped). Wikitext is reduced to text:
               templates, tables, references, files, categories and the reference/link sections are left out.
               License: the text is Wikipedia's, CC BY-SA 3.0 (and GFDL); gensim itself is LGPL-2.1.

Debian packages are taken with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed,
no root needed); the wheel with `pip download gensim==VERSION --no-deps --only-binary :all:`.

Output (`--out`, default work/english/):
  corpus.jsonl   one document per line, {"id": "wikipedia/Anarchism#3", "source": "wikipedia", "text": ...}:
                 each source's text cut at paragraph (else sentence) boundaries into blocks of at most
                 `--block-words` words (300: a few hundred tokens); paragraphs that look like code or tables
                 (few letters, many code symbols) and blocks under `--min-words` are dropped.
                 Read it with `dupmae prepare work/english/corpus.jsonl ...` or `dupmae train-tokenizer`.
  sources.json   per source: documents, words, bytes, the package and its version and sha256, the license
  licenses/      each source's copyright file as shipped

Held-out queries: the usage examples that data/wordnet uses as evaluation (and fine-tuning) queries are
WordNet's own example sentences, and GCIDE's WordNet 1.5 glosses repeat many of them. Pre-training on
"definition; example" pairs would teach the very query -> document link the evaluation measures, so every
double-quoted example whose words equal a query of a `--hold-out` file (default data/wordnet/queries.jsonl)
is removed, in every source; sources.json counts them. `--hold-out none` keeps them.

`--extra` appends unlabeled target documents (a BEIR folder or its corpus.jsonl: {"_id", "title", "text"},
or any jsonl with a "text" field), tagged with their own source name (the folder's name, or NAME=PATH).
`--max-mb` caps corpus.jsonl: extra documents are kept whole, and the English sources share the rest in
proportion to their size, each keeping a subset of its documents chosen by a hash of their ids.

Deterministic: the same packages, wheel, extra files and options give a byte-identical output.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[english] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(package: str, cache: Path) -> dict:
    """The package's .deb in cache/debs (apt-get download on first use), unpacked once into cache/root/."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        if not shutil.which("apt-get"):
            raise BuildError(f"{package}: not in {debs} and apt-get is not available; put {package}_*.deb there")
        log(f"apt-get download {package}")
        r = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not found:
            raise BuildError(f"apt-get download {package} failed (exit {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-500:]}; is the apt package list present "
                             "(apt-get update)?")
    if len(found) > 1:
        raise BuildError(f"{debs} holds several versions of {package} ({', '.join(p.name for p in found)}): "
                         "keep the one to build from")
    deb = found[0]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    root = cache / "root" / deb.stem
    if not root.is_dir():
        log(f"dpkg-deb -x {deb.name}")
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        os.replace(tmp, root)
    return {"package": package, "version": version, "file": deb.name, "sha256": sha256_file(deb), "root": root}


def fetch_gensim_wheel(cache: Path, version: str) -> dict:
    wheels = cache / "pip"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"gensim-{version}-*.whl"))
    if not found:
        log(f"pip download gensim=={version} (the wheel only, for its test data; nothing is installed)")
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"gensim=={version}", "--no-deps",
                            "--only-binary", ":all:", "--dest", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob(f"gensim-{version}-*.whl"))
        if r.returncode != 0 or not found:
            raise BuildError(f"pip download gensim=={version} failed (exit {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
    wheel = found[0]  # any platform's wheel: the test data inside is the same
    return {"package": "gensim", "version": version, "file": wheel.name, "sha256": sha256_file(wheel),
            "wheel": wheel}


# ----------------------------------------------------------------------------------- text to documents

WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
CODE_WORD = re.compile(r"[=_{}<>$@\\|]|\(\)|::|->|^[#%&*]|\w\.\w+\(")


def is_prose(paragraph: str, min_words: int = 3) -> bool:
    """False for what looks like code, a table row, a list of symbols or a fragment: fewer than min_words
    words, letters under 70% of the non-space characters, or more than 20% of the words carrying code
    symbols."""
    words = paragraph.split()
    if len(words) < min_words:
        return False
    chars = sum(len(w) for w in words)
    letters = sum(c.isalpha() for c in paragraph)
    if letters < 0.7 * chars:
        return False
    return sum(bool(CODE_WORD.search(w)) for w in words) <= 0.2 * len(words)


def prose(paragraphs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The (text, is_heading) paragraphs that read as prose; a heading may be short, not longer than 15 words."""
    return [(t, h) for t, h in paragraphs if (is_prose(t, 1) and len(t.split()) <= 15 if h else is_prose(t))]


def split_long(paragraph: str, max_words: int) -> list[str]:
    """A paragraph of more than max_words words -> pieces at sentence ends (else every max_words words)."""
    pieces, cur, n = [], [], 0
    for sentence in SENTENCE_END.split(paragraph):
        words = sentence.split()
        while len(words) > max_words:  # one enormous "sentence": cut it by words
            if cur:
                pieces.append(" ".join(cur))
                cur, n = [], 0
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if n + len(words) > max_words and cur:
            pieces.append(" ".join(cur))
            cur, n = [], 0
        cur.extend(words)
        n += len(words)
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def blocks(paragraphs: list[tuple[str, bool]], max_words: int, min_words: int) -> list[str]:
    """(text, is_heading) paragraphs packed greedily, in order, into blocks of at most max_words words, one
    paragraph a line. A heading travels with the paragraph after it (a heading followed by another heading
    or by nothing is dropped); a too-short last block joins the one before it; blocks still under
    min_words words are dropped."""
    out: list[list[str]] = []
    cur: list[str] = []
    n = 0
    heading = None
    for text, is_heading in paragraphs:
        if is_heading:
            heading = text
            continue
        w = len(text.split())
        for part in (split_long(text, max_words) if w > max_words else [text]):
            unit = [heading, part] if heading else [part]
            heading = None
            w = sum(len(u.split()) for u in unit)
            if n + w > max_words and cur:
                out.append(cur)
                cur, n = [], 0
            cur.extend(unit)
            n += w
    if cur:
        if out and n < min_words:
            out[-1].extend(cur)
        else:
            out.append(cur)
    texts = ["\n".join(b) for b in out]
    return [t for t in texts if len(t.split()) >= min_words]


def squash(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------- held-out text

SEGMENT = re.compile(r'"[^"\n]*"|[^.;:!?"\n]+')  # a quoted span, or a run of text between stops


def normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class HoldOut:
    """Removes every quoted span or sentence piece (text between . ; : ! ? and quotes, GCIDE's "as, "
    introducing an example left out) whose words equal a held-out query; counts the removals per source."""

    def __init__(self, queries: set[str]):
        self.queries = queries
        self.lengths = {len(q.split()) for q in queries}
        self.removed: dict[str, int] = {}

    def __call__(self, text: str, source: str) -> str:
        if not self.queries:
            return text
        before = self.removed.get(source, 0)

        def drop(m: re.Match) -> str:
            piece = re.sub(r"^\s*as,\s+", "", m.group(0).strip('"'))
            if len(piece.split()) in self.lengths and normalized(piece) in self.queries:
                self.removed[source] = self.removed.get(source, 0) + 1
                return ""
            return m.group(0)

        out = SEGMENT.sub(drop, text)
        if self.removed.get(source, 0) == before:
            return text
        out = re.sub(r"[ \t]*[;,](?=[ \t]*(?:[;.]|$))", "", out, flags=re.M)  # "def; ." -> "def."
        out = re.sub(r"[ \t]+([.;:!?])", r"\1", out)
        return "\n".join(squash(line) for line in out.split("\n")).strip()


def load_hold_out(paths: list[str]) -> tuple[set[str], list[dict]]:
    queries: set[str] = set()
    described = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "queries.jsonl"
        if not path.is_file():
            raise BuildError(f"--hold-out {p}: no such queries file")
        n = 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise BuildError(f"{path}:{line_no}: not a query record with a 'text' field ({e})") from None
                key = normalized(text)
                if len(key.split()) >= 3:  # a two-word example is a phrase, not a sentence to recognize
                    queries.add(key)
                    n += 1
        described.append({"path": rel(path), "queries": n, "sha256": sha256_file(path)})
    return queries, described


def rel(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ python-docs

HTML_BLOCK = {"p", "div", "section", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th",
              "table", "ul", "ol", "dl", "blockquote", "caption", "figcaption", "article", "aside"}
HTML_VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6", "dt"}  # a glossary term (dt) heads its definition
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents)\.html$")


class HtmlText(HTMLParser):
    """Paragraphs of a Sphinx page's main content (div role=main), without code, signatures, scripts,
    navigation and permalink marks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []
        self.skipping = self.in_main = self.in_heading = 0
        self.buf: list[str] = []
        self.paragraphs: list[tuple[str, bool]] = []  # (text, is_heading)

    def handle_starttag(self, tag, attrs):
        if tag in HTML_VOID:
            if tag == "br":
                self._break()
            return
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        skip = (tag in ("script", "style", "pre", "nav", "footer")
                or (tag == "dt" and "sig" in cls) or (tag == "a" and "headerlink" in cls)
                or (tag == "div" and bool(cls & {"related", "sphinxsidebar", "footer", "highlight"})))
        main = a.get("role") == "main"
        if tag in HTML_BLOCK:
            self._break()
        self.stack.append((tag, skip, main))
        self.skipping += skip
        self.in_main += main
        self.in_heading += tag in HTML_HEADINGS

    def handle_startendtag(self, tag, attrs):
        if tag == "br":
            self._break()

    def handle_endtag(self, tag):
        if tag in HTML_VOID or not any(t == tag for t, _, _ in self.stack):
            return
        if tag in HTML_BLOCK:
            self._break()
        while self.stack:
            t, skip, main = self.stack.pop()
            self.skipping -= skip
            self.in_main -= main
            self.in_heading -= t in HTML_HEADINGS
            if t == tag:
                break

    def handle_data(self, data):
        if self.in_main and not self.skipping:
            self.buf.append(data)

    def _break(self):
        text = squash("".join(self.buf))
        self.buf = []
        if text and self.in_main:
            self.paragraphs.append((text, self.in_heading > 0))

    def close(self):
        super().close()
        self._break()


def python_docs(deb: dict, opts) -> list[tuple[str, str]]:
    found = sorted(deb["root"].glob("usr/share/doc/python3*/html"))
    if not found:
        raise BuildError(f"{deb['file']}: no usr/share/doc/python3.*/html inside")
    root = found[0]
    pages = sorted(p for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_") and not SKIP_PAGES.match(p.name))
    docs = []
    for page in pages:
        parser = HtmlText()
        parser.feed(page.read_text(encoding="utf-8"))
        parser.close()
        name = page.relative_to(root).as_posix()
        for k, text in enumerate(blocks(prose(parser.paragraphs), opts.block_words, opts.min_words)):
            docs.append((f"{name}#{k}", text))
    log(f"python-docs: {len(pages)} pages")
    return docs


# ------------------------------------------------------------------------------------------------ gcide

B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dict_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64[c]
    return n


PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
HEAD_PHONETIC = re.compile(r"^(.*?\\[^\\\n]*\\)\s*\([^()\n]*\)")  # "Dug \Dug\ (d[u^]g), n." -> "Dug \Dug\, n."
CITATION = re.compile(r"\s*--\s?[A-Z][^\n]*$", re.M)  # "--Shak." / "--Bp. Hall." at a line's end
ACCENTED = re.compile(r"\[[=\-.'`\"^~*,]([A-Za-z]{1,2})\]|\[([A-Za-z]{1,2})\^\]")  # [=a] ['e] [.u] [i^] [oo^]
NAMED_CHARS = {"ae": "ae", "oe": "oe", "AE": "Ae", "OE": "Oe", "imac": "i", "aum": "a", "add": "a", "asl": "a",
               "udd": "u", "eth": "th", "thorn": "th", "th": "th", "ng": "ng", "yogh": "gh", "deg": "\u00b0",
               "sect": "\u00a7", "para": "\u00b6", "pounds": "\u00a3", "times": "\u00d7", "div": "\u00f7",
               "divby": "\u00f7", "middot": "\u00b7", "nbsp": " ", "ldqo": "\u201c", "rdqo": "\u201d",
               "min": "\u2032", "sec": "\u2033", "root": "\u221a", "cuberoot": "\u221b", "dagger": "\u2020",
               "dag": "\u2020", "flat": "\u266d", "sharp": "\u266f", "natural": "\u266e", "rarr": "\u2192"}
GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def gcide_char(m: re.Match) -> str:
    name = m.group(1)
    if name in NAMED_CHARS:
        return NAMED_CHARS[name]
    if name.lower() in GREEK:
        letter = "LAMDA" if name.lower() == "lambda" else name.upper()  # Unicode's spelling
        return unicodedata.lookup(f"GREEK {'CAPITAL' if name[0].isupper() else 'SMALL'} LETTER {letter}")
    return m.group(0)


def strip_brackets(text: str) -> str:
    """Removes [...] spans (etymologies, "[1913 Webster]", "[Obs.]", editors' notes), nested ones too."""
    prev = None
    while prev != text:
        prev, text = text, re.sub(r"\[[^\[\]]*\]", "", text)
    return text.replace("[", "").replace("]", "")


def gcide_entry(raw: str) -> str:
    """One dictd entry -> "Headword, n. definitions ..."; pronunciations, etymologies, source tags, synonym
    blocks and quotation authors dropped; GCIDE's character codes ([=a], [ae], [alpha]) made characters."""
    head, _, rest = raw.strip("\n").partition("\n")
    text = HEAD_PHONETIC.sub(r"\1", head.strip()) + "\n" + rest
    text = PRONUNCIATION.sub("", text)
    text = CITATION.sub("", text)
    text = ACCENTED.sub(lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"\[([A-Za-z]+)\]", gcide_char, text)
    paragraphs = re.split(r"\n\s*\n", text)
    kept = [p for p in paragraphs if not p.strip().startswith(("Syn:", "Syn.", "Ant:"))]
    text = strip_brackets(" ".join(kept))
    text = text.replace("{", "").replace("}", "")
    text = squash(text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;])\1+", r"\1", text)
    return text


def gcide(deb: dict, opts) -> list[tuple[str, str]]:
    base = deb["root"] / "usr/share/dictd"
    index, data = base / "gcide.index", base / "gcide.dict.dz"
    if not index.is_file() or not data.is_file():
        raise BuildError(f"{deb['file']}: no usr/share/dictd/gcide.index and gcide.dict.dz inside")
    # dictzip is gzip with an index of its own; the file is mostly ASCII with a few Windows-1252 bytes
    body = gzip.decompress(data.read_bytes()).decode("cp1252", errors="replace")
    spans = set()
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith("00-database"):
                continue
            spans.add((dict_number(parts[1]), dict_number(parts[2])))
    entries = []
    for offset, length in sorted(spans):
        text = gcide_entry(body[offset:offset + length])
        if len(text.split()) >= 3:
            entries.append(text)
    log(f"gcide: {len(spans)} entries")
    return [(f"gcide#{k}", t) for k, t in enumerate(blocks([(e, False) for e in entries], opts.block_words, opts.min_words))]


# ---------------------------------------------------------------------------------------------- wordnet


def wordnet(deb: dict, opts, hold_out: HoldOut) -> list[tuple[str, str]]:
    wn = deb["root"] / "usr/share/wordnet"
    spec = importlib.util.spec_from_file_location("wordnet_build", HERE.parent / "wordnet/build.py")
    wordnet_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wordnet_build)
    lines = []
    for pos, name in wordnet_build.POS_FILES.items():
        if not (wn / name).is_file():
            raise BuildError(f"{deb['file']}: no usr/share/wordnet/{name} inside")
        for _, lemmas, definition, examples in wordnet_build.parse_data_file(wn / name, pos):
            gloss = "; ".join([definition] * bool(definition) + [f'"{e}"' for e in examples])
            gloss = hold_out(gloss, "wordnet")
            if gloss:
                lines.append(f"{', '.join(lemmas)}: {gloss}")
    log(f"wordnet: {len(lines)} synsets")
    return [(f"wordnet#{k}", t) for k, t in enumerate(blocks([(x, False) for x in lines], opts.block_words, opts.min_words))]


# -------------------------------------------------------------------------------------------- perl-docs

POD_ENTITIES = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|", "quot": '"', "amp": "&", "apos": "'"}


def pod_entity(name: str) -> str:
    if name in POD_ENTITIES:
        return POD_ENTITIES[name]
    try:
        if name.lower().startswith("0x"):
            return chr(int(name, 16))
        if name.isdigit():
            return chr(int(name, 8) if name.startswith("0") else int(name))
    except (ValueError, OverflowError):
        return ""
    return html.unescape(f"&{name};") if name.isalnum() else ""


def pod_link(body: str) -> str:
    """L<text|target> -> text; L<page/"section"> -> section; L<page> -> page."""
    if "|" in body:
        return body.split("|", 1)[0]
    if "/" in body and not body.startswith(("http:", "https:")):
        page, section = body.split("/", 1)
        return section.strip('"') or page
    return body.strip('"')


def pod_code(letter: str, body: str) -> str:
    if letter == "E":
        return pod_entity(body)
    if letter in "XZ":
        return ""
    if letter == "L":
        return pod_link(body)
    return body  # B I C F S: the text itself


def pod_inline(text: str) -> str:
    for n in (4, 3, 2):  # C<< $a <=> $b >> style codes first
        text = re.sub(r"([A-Z])" + "<" * n + r"\s+(.*?)\s+" + ">" * n,
                      lambda m: pod_code(m.group(1), m.group(2)), text, flags=re.S)
    prev = None
    while prev != text:
        prev = text
        text = re.sub(r"([BCEFILSXZ])<([^<>]*)>", lambda m: pod_code(m.group(1), m.group(2)), text)
    return text


def pod_paragraphs(source: str) -> list[tuple[str, bool]]:
    """(text, is_heading) for the headings, item labels and text paragraphs of a POD document."""
    out: list[tuple[str, bool]] = []
    in_pod, skip_until = True, None
    for para in re.split(r"\n[ \t]*\n", source.replace("\r\n", "\n")):
        if not para.strip():
            continue
        first = para.lstrip("\n")
        directive = re.match(r"=([a-z]\w*)\s*(.*)", first, re.S)
        if directive:
            command, rest = directive.groups()
            if skip_until:
                if command == "end" and rest.strip().split()[:1] == [skip_until]:
                    skip_until = None
                continue
            if command == "cut":
                in_pod = False
            elif command == "pod" or command.startswith("head"):
                in_pod = True
                if command.startswith("head") and rest.strip():
                    out.append((squash(pod_inline(rest)), True))
            elif command == "item":
                label = re.sub(r"^\*\s*", "", squash(pod_inline(rest)))
                if label and not re.fullmatch(r"\d+\.?", label):
                    out.append((label, True))
            elif command == "begin":
                skip_until = (rest.strip().split() or [""])[0]
            # =over, =back, =for (one paragraph), =encoding: nothing to keep
            continue
        if not in_pod or skip_until:
            continue
        if first[:1] in (" ", "\t"):  # verbatim paragraph: code or a drawing
            continue
        out.append((squash(pod_inline(first)), False))
    return out


def perl_docs(deb: dict, opts) -> list[tuple[str, str]]:
    pods = sorted((deb["root"] / "usr/share/perl").glob("*/pod/*.pod"))
    if not pods:
        raise BuildError(f"{deb['file']}: no usr/share/perl/*/pod/*.pod inside")
    docs = []
    for pod in pods:
        paragraphs = prose(pod_paragraphs(pod.read_text(encoding="utf-8", errors="replace")))
        for k, text in enumerate(blocks(paragraphs, opts.block_words, opts.min_words)):
            docs.append((f"{pod.stem}#{k}", text))
    log(f"perl-docs: {len(pods)} pod files")
    return docs


# -------------------------------------------------------------------------------------------- wikipedia

SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                 "sources", "footnotes", "citations", "notes and references", "works cited", "gallery"}
WIKI_DROP_TAGS = re.compile(r"<(ref|math|gallery|timeline|source|syntaxhighlight|score|imagemap|chem)\b[^>]*?"
                            r"(/>|>.*?</\1\s*>)", re.S | re.I)
LINK_PREFIX = re.compile(r"^(file|image|category|media|wikipedia|wp|template|help|portal|[a-z]{2,3}(-[a-z]+)?):",
                         re.I)


def _nested(pattern: str, repl, text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, re.sub(pattern, repl, text, flags=re.S)
    return text


def _wikilink(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if LINK_PREFIX.match(target.strip()):
        return ""
    return (label or target).split("|")[-1]


def _convert(m: re.Match) -> str:
    """{{convert|3|to|5|km|...}} -> "3 to 5 km": the measure as written, without its conversion."""
    parts = [x.strip() for x in m.group(1).split("|") if "=" not in x]
    if len(parts) >= 4 and parts[1] in ("to", "-", "and", "by", "x", "or", "+"):
        return " ".join(parts[:4])
    return " ".join(parts[:2])


def wikitext_paragraphs(wikitext: str) -> list[tuple[str, bool]]:
    """(text, is_heading) paragraphs of an article's wikitext, the reference and link sections left out."""
    t = html.unescape(wikitext)  # the dump escapes &nbsp; etc. once more inside the text
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = WIKI_DROP_TAGS.sub("", t)
    t = re.sub(r"\{\{\s*(?:convert|cvt)\s*\|([^{}]*)\}\}", _convert, t, flags=re.I)
    t = _nested(r"\{\{[^{}]*\}\}", "", t)  # templates (infoboxes, citations), innermost first
    t = _nested(r"\{\|(?:(?!\{\|).)*?\|\}", "", t)  # tables
    t = _nested(r"\[\[([^\[\]]*)\]\]", _wikilink, t)  # links; file/category links (captions too) go
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", t)  # [http://x label] -> label
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)  # remaining tags: keep their text
    t = re.sub(r"__[A-Z]+__", "", t)
    out: list[tuple[str, bool]] = []
    skipping = 0
    for para in re.split(r"\n\s*\n|\n(?==)|(?<==)\n", t):
        para = para.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", para)
        if heading:
            level = len(heading.group(1))
            if skipping and level > skipping:
                continue
            skipping = level if heading.group(2).strip().lower() in SKIP_SECTIONS else 0
            if not skipping:
                out.append((heading.group(2), True))
            continue
        if skipping:
            continue
        lines = []
        for line in para.split("\n"):
            line = line.strip()
            if line.startswith(("|", "!", "{", "}")):
                continue
            lines.append(re.sub(r"^[*#:;]+\s*", "", line))
        text = squash(" ".join(lines))
        if text:
            out.append((text, False))
    return out


def wikipedia(wheel: dict, opts) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel["wheel"]) as z:
        if WIKI_MEMBER not in z.namelist():
            raise BuildError(f"{wheel['file']} has no {WIKI_MEMBER}; pass --gensim-version {GENSIM_VERSION}")
        raw = bz2.decompress(z.read(WIKI_MEMBER))
    docs = []
    articles = 0
    for _, el in ET.iterparse(io.BytesIO(raw)):
        if not el.tag.endswith("}page"):
            continue
        ns_tag = el.tag[:-len("page")]
        title = el.findtext(f"{ns_tag}title") or ""
        text = el.findtext(f"{ns_tag}revision/{ns_tag}text") or ""
        if el.findtext(f"{ns_tag}ns") == "0" and el.find(f"{ns_tag}redirect") is None:
            articles += 1
            paragraphs = prose(wikitext_paragraphs(text))
            slug = title.replace(" ", "_")
            for k, block in enumerate(blocks(paragraphs, opts.block_words, opts.min_words)):
                docs.append((f"{slug}#{k}", block))
        el.clear()
    log(f"wikipedia: {articles} articles")
    return docs


# ------------------------------------------------------------------------------------------------ extra


def parse_extra(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        name, path = "", spec
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "corpus.jsonl"
    if not p.is_file():
        raise BuildError(f"--extra {spec}: no such file (give a BEIR folder, its corpus.jsonl or a jsonl file)")
    if not name:
        name = p.parent.name if p.name.startswith("corpus.") else p.name.split(".")[0]
    if name in SOURCES:
        raise BuildError(f"--extra {spec}: the name {name!r} is one of the English sources; use NAME=PATH")
    return name, p


def extra_docs(name: str, path: Path, opts) -> list[tuple[str, str]]:
    docs = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                body = obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BuildError(f"{path}:{line_no}: not a document with a 'text' field ({e})") from None
            title = obj.get("title") or ""
            body = squash(body or "")
            title = squash(title) if isinstance(title, str) else ""
            text = body if not title or body.lower().startswith(title.lower()) else f"{title}\n{body}"
            doc_id = str(obj.get("_id", obj.get("id", line_no)))
            for k, block in enumerate(blocks([(p, False) for p in text.split("\n") if p], opts.block_words, 1)):
                docs.append((f"{doc_id}#{k}", block))
    return docs


# ------------------------------------------------------------------------------------------------- main

SOURCES = {
    "python-docs": {"package": "python3.11-doc", "license": "PSF-2.0 (Python Software Foundation License Version 2)",
                    "copyright": "usr/share/doc/{package}/copyright"},
    "gcide": {"package": "dict-gcide", "license": "GPL-2.0-or-later",
              "copyright": "usr/share/doc/{package}/copyright"},
    "wordnet": {"package": "wordnet-base", "license": "WordNet 3.0 license (BSD-style)",
                "copyright": "usr/share/doc/{package}/copyright"},
    "perl-docs": {"package": "perl-doc", "license": "GPL-1.0-or-later OR Artistic-1.0-Perl",
                  "copyright": "usr/share/doc/{package}/copyright"},
    "wikipedia": {"package": "gensim (PyPI wheel, test data only)",
                  "license": "CC-BY-SA-3.0 and GFDL (Wikipedia text), shipped in gensim (LGPL-2.1-only)"},
}

WIKIPEDIA_LICENSE = """English Wikipedia articles (dump enwiki-latest-pages-articles1, 2016), as shortened and
shipped by gensim (https://github.com/piskvorky/gensim, LGPL-2.1-only) in {member}
of {wheel}.

The text of Wikipedia is available under the Creative Commons Attribution-ShareAlike 3.0 Unported License
(https://creativecommons.org/licenses/by-sa/3.0/) and the GNU Free Documentation License. Authors: the
contributors to each article (its history on https://en.wikipedia.org/).
"""


def select(docs_by_source: dict, cap_bytes: int, fixed_bytes: int) -> dict:
    """Each English source keeps the same share of its bytes, by ascending hash of the document id."""
    total = sum(len(line) for docs in docs_by_source.values() for _, line in docs)
    budget = max(cap_bytes - fixed_bytes, 0)
    if total <= budget:
        return docs_by_source
    share = budget / total
    out = {}
    for source, docs in docs_by_source.items():
        allowed = share * sum(len(line) for _, line in docs)
        ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i][0].encode()).digest())
        keep, used = set(), 0
        for i in ranked:
            if used + len(docs[i][1]) > allowed:
                continue
            keep.add(i)
            used += len(docs[i][1])
        out[source] = [d for i, d in enumerate(docs) if i in keep]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "work/english", help="output folder (default work/english)")
    ap.add_argument("--cache", type=Path, default=REPO / "work/cache/english",
                    help="downloaded .deb files, the wheel and unpacked packages (default work/cache/english)")
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help=f"comma-separated subset of {', '.join(SOURCES)} (default all); '' for none")
    ap.add_argument("--extra", action="append", default=[], metavar="[NAME=]PATH",
                    help="target documents to append: a BEIR folder, its corpus.jsonl or a jsonl with 'text' "
                         "(repeatable; source name = the folder's name unless NAME= is given)")
    ap.add_argument("--max-mb", type=float, default=None, help="cap on corpus.jsonl in MB (10^6 bytes)")
    ap.add_argument("--block-words", type=int, default=300, help="most words per document (default 300)")
    ap.add_argument("--min-words", type=int, default=20, help="fewest words per document (default 20)")
    ap.add_argument("--hold-out", action="append", default=None, metavar="QUERIES",
                    help="queries jsonl (or BEIR folder) whose texts are removed where quoted as examples "
                         "(repeatable; default data/wordnet/queries.jsonl; 'none' for none)")
    ap.add_argument("--python-doc", default="python3.11-doc",
                    help="the Debian package of the Python documentation (default python3.11-doc, Debian 12's)")
    ap.add_argument("--gensim-version", default=GENSIM_VERSION, help=f"the wheel to read (default {GENSIM_VERSION})")
    args = ap.parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def build(args) -> None:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise BuildError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    if args.block_words < 20 or not 1 <= args.min_words <= args.block_words:
        raise BuildError("--block-words must be >= 20 and --min-words in [1, --block-words]")
    if args.max_mb is not None and args.max_mb <= 0:
        raise BuildError("--max-mb must be positive")
    extras = [parse_extra(spec) for spec in args.extra]
    names = [n for n, _ in extras]
    if len(set(names)) != len(names):
        raise BuildError(f"two --extra inputs share a source name ({', '.join(names)}); use NAME=PATH")
    if not sources and not extras:
        raise BuildError("nothing to build: no --sources and no --extra")
    hold_paths = args.hold_out if args.hold_out is not None else (
        [str(HERE.parent / "wordnet/queries.jsonl")] if (HERE.parent / "wordnet/queries.jsonl").is_file() else [])
    hold_paths = [p for p in hold_paths if p.lower() != "none"]
    queries, hold_info = load_hold_out(hold_paths)
    hold_out = HoldOut(queries)

    cache = args.cache.expanduser().resolve()
    docs_by_source: dict[str, list[tuple[str, str]]] = {}
    meta: dict[str, dict] = {}
    for source in sources:
        info = SOURCES[source]
        if source == "wikipedia":
            pkg = fetch_gensim_wheel(cache, args.gensim_version)
            docs = wikipedia(pkg, args)
        else:
            pkg = fetch_deb(args.python_doc if source == "python-docs" else info["package"], cache)
            fn = {"python-docs": lambda: python_docs(pkg, args), "gcide": lambda: gcide(pkg, args),
                  "wordnet": lambda: wordnet(pkg, args, hold_out), "perl-docs": lambda: perl_docs(pkg, args)}[source]
            docs = fn()
        docs = [(doc_id, hold_out(text, source)) for doc_id, text in docs]
        docs_by_source[source] = [(f"{source}/{doc_id}", _line(f"{source}/{doc_id}", source, text))
                                  for doc_id, text in docs]
        meta[source] = {"package": pkg["package"], "version": pkg["version"], "file": pkg["file"],
                        "sha256": pkg["sha256"], "license": info["license"]}
        if source == "wikipedia":
            meta[source]["member"] = WIKI_MEMBER
        meta[source]["_pkg"] = pkg
        size = sum(len(line) for _, line in docs_by_source[source])
        log(f"{source}: {len(docs)} documents, {size / 1e6:.1f} MB")

    extra_lines: dict[str, list[tuple[str, str]]] = {}
    for name, path in extras:
        docs = extra_docs(name, path, args)
        extra_lines[name] = [(f"{name}/{d}", _line(f"{name}/{d}", name, t)) for d, t in docs]
        meta[name] = {"path": rel(path), "sha256": sha256_file(path), "license": "see the data set's own terms",
                      "extra": True}
        log(f"{name}: {len(docs)} documents from {rel(path)}")

    fixed = sum(len(line) for docs in extra_lines.values() for _, line in docs)
    if args.max_mb is not None:
        cap = int(args.max_mb * 1e6)
        if fixed > cap:
            log(f"the --extra documents alone ({fixed / 1e6:.1f} MB) exceed --max-mb; they are kept whole")
        docs_by_source = select(docs_by_source, cap, fixed)

    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "corpus.jsonl.tmp"
    stats = {}
    with open(tmp, "wb") as f:
        for source, docs in list(docs_by_source.items()) + list(extra_lines.items()):
            words = 0
            for _, line in docs:
                f.write(line)
                words += len(json.loads(line)["text"].split())
            stats[source] = {"documents": len(docs), "words": words, "bytes": sum(len(line) for _, line in docs)}
    os.replace(tmp, out / "corpus.jsonl")

    licenses = out / "licenses"
    shutil.rmtree(licenses, ignore_errors=True)  # a source left out of this build leaves no license behind
    licenses.mkdir()
    for source in sources:
        pkg = meta[source].pop("_pkg")
        target = licenses / f"{source}.txt"
        if source == "wikipedia":
            target.write_text(WIKIPEDIA_LICENSE.format(member=WIKI_MEMBER, wheel=pkg["file"]), encoding="utf-8")
        else:
            inside = SOURCES[source]["copyright"].format(package=pkg["package"])
            copyright_file = pkg["root"] / inside
            if not copyright_file.is_file():
                raise BuildError(f"{pkg['file']}: no {inside} inside")
            shutil.copyfile(copyright_file, target)
        meta[source]["license_file"] = f"licenses/{target.name}"
    summary = {
        "documents": sum(s["documents"] for s in stats.values()),
        "words": sum(s["words"] for s in stats.values()),
        "bytes": sum(s["bytes"] for s in stats.values()),
        "options": {"block_words": args.block_words, "min_words": args.min_words, "max_mb": args.max_mb},
        "hold_out": {"files": hold_info, "removed_examples": dict(sorted(hold_out.removed.items()))},
        "sources": {name: {**stats[name], **meta[name]} for name in stats},
    }
    (out / "sources.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, s in summary["sources"].items():
        log(f"  {name:<12} {s['documents']:>8,} documents {s['words']:>12,} words {s['bytes'] / 1e6:>8.1f} MB")
    log(f"{summary['documents']:,} documents, {summary['words']:,} words, {summary['bytes'] / 1e6:.1f} MB "
        f"-> {out / 'corpus.jsonl'}; held-out examples removed: {sum(hold_out.removed.values())}")


def _line(doc_id: str, source: str, text: str) -> bytes:
    return (json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
