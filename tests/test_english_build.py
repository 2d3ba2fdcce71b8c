"""data/english/build.py without downloads: each source's text extraction on a sample in its own format,
block packing, held-out queries, and a whole build from --extra documents (deterministic, capped, counted)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("english_build", REPO / "data/english/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GCIDE_ENTRY = r"""Across \A*cross"\ (#; 115), prep. [Pref. a- + cross: cf. F. en
   croix. See {Cross}, n.]
   From side to side; athwart; crosswise, or in a direction
   opposed to the length; quite over; as, a bridge laid across a
   river. --Dryden.
   [1913 Webster]

   {To come across}, to come upon or meet incidentally.
      --Freeman.

   Syn: athwart, crosswise
        [WordNet 1.5]
"""


def test_gcide_entry(build):
    assert build.gcide_entry(GCIDE_ENTRY) == (
        "Across, prep. From side to side; athwart; crosswise, or in a direction opposed to the length; quite "
        "over; as, a bridge laid across a river. To come across, to come upon or meet incidentally.")
    # the phonetic spelling after the headword goes; GCIDE's character codes become characters
    assert build.gcide_entry("Dug \\Dug\\ (d[u^]g), n. [AS.]\n   A teat; an [ae]on of [alpha] and [lambda].\n") == (
        "Dug, n. A teat; an aeon of \u03b1 and \u03bb.")
    assert build.dict_number("Kj") == 10 * 64 + 35


POD = """=encoding utf8

=head1 NAME

perlsec - Perl security

=head2 Taint mode

Perl automatically enables a set of special security checks, called I<taint
mode>, when it detects its program running with differing real and effective
user or group IDs (see L<perlrun/-T> and L<the manual|perlfunc>); C<< $a <=> $b >> E<lt>here E<gt>.

    $obj->$method(@args);   # a verbatim paragraph: code

=for comment
Nothing of this is kept.

=begin html

<p>nor this</p>

=end html

=over 4

=item * Symbolic methods

=back

=cut

sub code { 1 }
"""


def test_pod_paragraphs(build):
    assert build.pod_paragraphs(POD) == [
        ("NAME", True), ("perlsec - Perl security", False), ("Taint mode", True),
        ("Perl automatically enables a set of special security checks, called taint mode, when it detects its "
         "program running with differing real and effective user or group IDs (see -T and the manual); "
         "$a <=> $b <here >.", False),
        ("Symbolic methods", True)]


WIKITEXT = """{{Infobox animal|name=Aardwolf|image=[[File:A.jpg|thumb|An [[aardwolf]]]]}}
The '''aardwolf''' (''Proteles cristatus'') is a small [[insectivore|insectivorous]] [[mammal]],<ref>{{cite
book|title=X}}</ref> native to [[East Africa|East]] and Southern Africa. It is about {{convert|55|to|80|cm|in}}
long.<!-- a comment --> See [http://example.org the site].

== Physical characteristics ==
{| class="wikitable"
| a || b
|}
The aardwolf resembles a very thin striped hyena.
* It has a mane.

== References ==
{{reflist}}
* Smith, J. (2001). ''Aardwolves''.

== Behaviour ==
It is nocturnal.
[[Category:Hyenas]]
"""


def test_wikitext_paragraphs(build):
    assert build.wikitext_paragraphs(WIKITEXT) == [
        ("The aardwolf (Proteles cristatus) is a small insectivorous mammal, native to East and Southern "
         "Africa. It is about 55 to 80 cm long. See the site.", False),
        ("Physical characteristics", True),
        ("The aardwolf resembles a very thin striped hyena. It has a mane.", False),
        ("Behaviour", True), ("It is nocturnal.", False)]


HTML = """<html><head><title>t</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><a href="x">next</a></div>
<div class="body" role="main"><section>
<h1>functools — Higher-order functions<a class="headerlink" href="#m">¶</a></h1>
<p>The <code>functools</code> module is for higher-order functions: functions that act on
or return other functions.</p>
<dl class="py function"><dt class="sig sig-object py">functools.cache(<em>user_function</em>)</dt>
<dd><p>Simple lightweight unbounded function cache.</p>
<div class="highlight-python3"><div class="highlight"><pre>@cache
def f(n): return n</pre></div></div></dd></dl>
<dl class="glossary"><dt>abstract base class</dt><dd><p>Abstract base classes complement duck-typing.</p></dd></dl>
</section></div>
<div class="footer">Copyright</div></body></html>"""


def test_html_text(build):
    parser = build.HtmlText()
    parser.feed(HTML)
    parser.close()
    assert parser.paragraphs == [
        ("functools — Higher-order functions", True),
        ("The functools module is for higher-order functions: functions that act on or return other functions.",
         False),
        ("Simple lightweight unbounded function cache.", False),
        ("abstract base class", True), ("Abstract base classes complement duck-typing.", False)]


def test_is_prose(build):
    assert build.is_prose("The cache is threadsafe so the wrapped function can be used in multiple threads.")
    assert not build.is_prose("x = foo(bar)[0] + baz_qux({'a': 1})")
    assert not build.is_prose("| 12 | 34 | 56.7 | 8.9 |")
    assert not build.is_prose("Two words")
    assert build.is_prose("History", min_words=1)


def test_blocks(build):
    words = lambda n, w="word": " ".join([w] * n)  # noqa: E731
    first, second = "Long " + words(49, "long") + ".", "More " + words(49, "more") + "."
    paras = [("Title", True), (words(30), False), ("Orphan", True), ("Next", True), (words(30), False),
             (f"{first} {second}", False), (words(5, "tail"), False)]
    out = build.blocks(paras, max_words=70, min_words=10)
    # the orphaned heading is dropped; the long paragraph is cut at its sentence end
    assert out == ["Title\n" + words(30) + "\nNext\n" + words(30), first, second + "\n" + words(5, "tail")]
    assert all(len(b.split()) <= 70 for b in out)
    # one enormous sentence is cut by words; a short last block joins the one before it
    assert [len(b.split()) for b in build.blocks([(words(150), False)], 70, 20)] == [70, 80]
    assert build.blocks([(words(5), False)], 70, 20) == []


def test_hold_out_removes_query_examples(build):
    queries = {build.normalized(q) for q in ("They pulled the canoe up on the bank", "he ran the store")}
    hold = build.HoldOut(queries)
    assert hold('sloping land; "they pulled the canoe up on the bank"', "wordnet") == "sloping land"
    assert hold("a negotiator; as, he ran the store. 2. a refusal", "gcide") == "a negotiator. 2. a refusal"
    untouched = 'keep "this example" as it is; as, he ran the shop.'
    assert hold(untouched, "gcide") is untouched
    assert hold.removed == {"wordnet": 1, "gcide": 1}


def write_beir(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            text = f"Document {i} studies how the wing of an aircraft behaves in a slipstream at angle {i}. " * 3
            f.write(json.dumps({"_id": str(i), "title": f"Wing study {i}", "text": text}) + "\n")
    return folder


def run(build, *argv) -> int:
    return build.main([str(a) for a in argv])


def test_build_from_extra_documents(build, tmp_path):
    beir = write_beir(tmp_path / "aero", 40)
    args = ["--sources", "", "--extra", beir, "--extra", f"second={beir / 'corpus.jsonl'}", "--hold-out", "none",
            "--cache", tmp_path / "cache"]
    assert run(build, *args, "--out", tmp_path / "a") == 0
    assert run(build, *args, "--out", tmp_path / "b") == 0
    for name in ("corpus.jsonl", "sources.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    docs = [json.loads(line) for line in open(tmp_path / "a/corpus.jsonl", encoding="utf-8")]
    assert [d["source"] for d in docs] == ["aero"] * 40 + ["second"] * 40
    assert docs[0]["id"] == "aero/0#0" and docs[0]["text"].startswith("Wing study 0\nDocument 0 studies")
    meta = json.loads((tmp_path / "a/sources.json").read_text())
    assert meta["documents"] == 80 and meta["sources"]["aero"]["documents"] == 40
    assert meta["bytes"] == (tmp_path / "a/corpus.jsonl").stat().st_size
    assert not (tmp_path / "cache").exists()  # nothing to fetch


def test_max_mb_shares_the_cap_by_source(build):
    docs = {"a": [(f"a/{i}", b"x" * 100) for i in range(100)], "b": [(f"b/{i}", b"y" * 100) for i in range(300)]}
    kept = build.select(docs, cap_bytes=20_000, fixed_bytes=0)
    assert (len(kept["a"]), len(kept["b"])) == (50, 150)
    assert kept == build.select(docs, cap_bytes=20_000, fixed_bytes=0)
    assert [d[0] for d in kept["a"]] == sorted((d[0] for d in kept["a"]), key=lambda s: int(s.split("/")[1]))
    assert build.select(docs, cap_bytes=10**9, fixed_bytes=0) is docs


def test_errors(build, tmp_path, capsys):
    assert run(build, "--sources", "books", "--out", tmp_path / "x") == 2
    assert "unknown source(s) books" in capsys.readouterr().err
    assert run(build, "--sources", "", "--out", tmp_path / "x", "--hold-out", "none") == 2
    assert "nothing to build" in capsys.readouterr().err
    assert run(build, "--sources", "", "--extra", tmp_path / "none.jsonl", "--out", tmp_path / "x") == 2
    assert "--extra" in capsys.readouterr().err
    beir = write_beir(tmp_path / "wikipedia", 2)
    assert run(build, "--sources", "", "--extra", beir, "--out", tmp_path / "x") == 2
    assert "one of the English sources" in capsys.readouterr().err
