"""Routing by the request's own text: character and word n-grams of the raw input, a linear
model.

The paper's router reads the shared expert's pooled hidden states, which see the input as the
model does: tokenized, truncated (64 tokens in the main job) and, for an uncased tokenizer,
lowercased. The text a request arrives with keeps its case, punctuation, spacing and full
length, and those tell sources apart: on the main job's eight tasks a linear model on n-grams
of the raw text routes about 96% of held-out items right, against 94% for the pooled states,
and it costs no pass of θs at all (a fraction of a millisecond per text on the CPU).

Semantics: x = [x_char, x_word], each block l2_normalize((1 + log tf) ⊙ idf) over the text's
n-grams hashed into `n_features` buckets (scikit-learn's HashingVectorizer: analyzer "char",
`ngram_range` characters, runs of white space collapsed to one space; analyzer "word",
`word_ngram_range` runs of non-space tokens; MurmurHash3 buckets, so no vocabulary is stored;
TfidfTransformer with sublinear tf), and logits = x Wᵀ + b: a linear support vector machine
(scikit-learn's LinearSVC, one-vs-rest) whose scores are scaled so that their softmax is
calibrated (`fit_text_router` chooses C by held-out accuracy and the scale by held-out
cross-entropy; the scale is folded into W and b).
Memory: (T + 1)·n_features·blocks + T floats (18.0 MiB for 8 tasks at the default 2^18 buckets
and two blocks).

A TextRouter's input is a list of B strings, not a tensor: `router(texts)` -> logits [B, T],
`router.weights(texts)`. `TwinMergedModule` routes with it from the call's `router_text=`
(the texts of the batch's rows), with no pass of θs. `ProductRouter` multiplies its
probabilities with a hidden-state router's.
"""

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from twinmerge_ext.router import (Router, _describe, _eval_mode, _int_arg, _real_arg, _task_list,
                                  _tasks_of)

__all__ = ["ProductRouter", "TextRouter", "check_texts", "fit_product_alpha", "fit_text_router"]

_CONFIG_KEYS = ("kind", "tasks", "n_features", "ngram_range", "word_ngram_range", "lowercase",
                "max_chars")
# The SVM's regularization strengths fit_text_router tries (held-out accuracy decides), and the
# softmax scales (held-out cross-entropy decides).
CS = (0.5, 1.0, 2.0)
SCALES = tuple(float(s) for s in np.logspace(-1, 2, 31))


def check_texts(texts, fn: str, arg: str = "texts", rows: Optional[int] = None) -> List[str]:
    """texts as a list of str (a str alone is refused: it would be read as characters)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"{fn}: {arg} must be a list of strings (one per row), got "
                        f"{type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{fn}: {arg} must hold strings, got {type(texts[bad[0]]).__name__} "
                        f"at row {bad[0]}")
    if rows is not None and len(texts) != rows:
        raise ValueError(f"{fn}: {arg} has {len(texts)} rows but the batch has B={rows}")
    return list(texts)


def _range_arg(value, arg: str, fn: str, optional: bool = False):
    if value is None and optional:
        return None
    rng = tuple(value) if isinstance(value, (list, tuple)) else None
    if rng is None or len(rng) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in rng) \
            or not 1 <= rng[0] <= rng[1]:
        raise ValueError(f"{fn}: {arg} must be (min, max) with 1 <= min <= max"
                         + (" or None" if optional else "") + f", got {value!r}")
    return rng


class TextRouter(Router):
    """A linear model on hashed n-grams of the raw text (module docstring).

    Args:
        tasks: the task names, in logit order.
        n_features: hash buckets per block (a power of two is usual; 2^18 by default).
        ngram_range: (min, max) characters per character n-gram.
        word_ngram_range: (min, max) tokens per word n-gram (tokens: runs of non-space
            characters), or None for character n-grams alone.
        lowercase: fold case before counting (off by default: case tells sources apart).
        max_chars: read only each text's first max_chars characters (None: all of it): the
            cost of counting grows with the length, and the first characters tell most.
    Buffers: idf [D], weight [T, D], bias [T], D = n_features·blocks (character block first).
    A new router has zero weights (uniform weights): fit it (`fit_text_router`) or load its
    state dict.
    Errors: TypeError/ValueError naming the argument and its value.
    """

    kind = "text"
    reads_text = True

    def __init__(self, tasks: Sequence[str], n_features: int = 2 ** 18,
                 ngram_range: Sequence[int] = (1, 4),
                 word_ngram_range: Optional[Sequence[int]] = (1, 2), lowercase: bool = False,
                 max_chars: Optional[int] = None):
        super().__init__()
        fn = "TextRouter"
        self.tasks = _task_list(tasks, fn)
        if not self.tasks:
            raise ValueError(f"{fn}: tasks must name at least one task, got []")
        self.n_features = _int_arg(n_features, "n_features", fn, 1)
        self.ngram_range = _range_arg(ngram_range, "ngram_range", fn)
        self.word_ngram_range = _range_arg(word_ngram_range, "word_ngram_range", fn, True)
        if not isinstance(lowercase, bool):
            raise TypeError(f"{fn}: lowercase must be a bool, got {lowercase!r}")
        self.lowercase = lowercase
        self.max_chars = None if max_chars is None else _int_arg(max_chars, "max_chars", fn, 1)
        width = self.n_features * len(self._vectorizers())
        self.register_buffer("idf", torch.ones(width))
        self.register_buffer("weight", torch.zeros(len(self.tasks), width))
        self.register_buffer("bias", torch.zeros(len(self.tasks)))

    def _vectorizers(self):
        from sklearn.feature_extraction.text import HashingVectorizer
        common = dict(lowercase=self.lowercase, n_features=self.n_features,
                      alternate_sign=False, norm=None, dtype=np.float32)
        out = [HashingVectorizer(analyzer="char", ngram_range=self.ngram_range, **common)]
        if self.word_ngram_range is not None:
            out.append(HashingVectorizer(analyzer="word", ngram_range=self.word_ngram_range,
                                         token_pattern=r"\S+", **common))
        return out

    def counts(self, texts: Sequence[str]) -> list:
        """The texts' n-gram counts, one scipy CSR matrix [B, n_features] per block (what
        `fit_text_router` computes idf from)."""
        texts = check_texts(texts, "TextRouter.counts")
        if self.max_chars is not None:
            texts = [t[:self.max_chars] for t in texts]
        return [v.transform(texts) for v in self._vectorizers()]

    def featurize(self, texts: Sequence[str]):
        """x of the module docstring for each text, a scipy CSR matrix [B, D] (float64): what
        scikit-learn's TfidfTransformer(sublinear_tf=True) gives with this router's idf, reading
        only the idf entries of the n-grams present."""
        from scipy.sparse import csr_matrix, hstack
        from sklearn.preprocessing import normalize
        blocks = []
        for i, c in enumerate(self.counts(texts)):
            c = c.tocsr()
            c.sum_duplicates()
            cols = torch.from_numpy(c.indices.astype(np.int64) + i * self.n_features)
            idf = self.idf.detach()[cols.to(self.idf.device)].double().cpu().numpy()
            tfidf = csr_matrix(((1 + np.log(c.data.astype(np.float64))) * idf, c.indices,
                                c.indptr), shape=c.shape)
            blocks.append(normalize(tfidf, norm="l2", copy=False))
        return hstack(blocks, format="csr")

    def _logits(self, features, fn: str) -> Tensor:
        texts = check_texts(features, fn)
        x = self.featurize(texts)  # sparse: a few hundred n-grams per text
        dev, T = self.weight.device, self.num_tasks
        # x Wᵀ from the columns of W the texts' n-grams hit (never a copy of all of W).
        cols = torch.from_numpy(x.indices.astype(np.int64)).to(dev)
        rows = torch.from_numpy(np.repeat(np.arange(len(texts)), np.diff(x.indptr))).to(dev)
        vals = torch.from_numpy(x.data).to(dev, torch.float32)
        hit = self.weight.detach()[:, cols].float() * vals
        logits = torch.zeros(len(texts), T, device=dev).index_add_(0, rows, hit.t())
        return (logits + self.bias.detach().float()).to(self.weight.dtype)

    def features(self, served, input_ids: Tensor, attention_mask: Tensor):
        raise ValueError("TextRouter.features: a TextRouter reads the request's text, not "
                         "input_ids; pass the rows' texts (router_text= to TwinMergedModule)")

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Semantics: logits[b, t] = score of task t for text b. Shape: B texts -> [B, T]."""
        return self._logits(texts, "TextRouter.forward")

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "tasks": list(self.tasks), "n_features": self.n_features,
                "ngram_range": list(self.ngram_range),
                "word_ngram_range": None if self.word_ngram_range is None
                else list(self.word_ngram_range), "lowercase": self.lowercase,
                "max_chars": self.max_chars}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> "TextRouter":
        fn = "TextRouter.from_config"
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{fn}: cfg must be a mapping, got {type(cfg).__name__}")
        if cfg.get("kind") != cls.kind or set(cfg) != set(_CONFIG_KEYS):
            raise ValueError(f"{fn}: cfg must have exactly the keys {sorted(_CONFIG_KEYS)} with "
                             f"kind 'text', got {sorted(cfg)} (kind {cfg.get('kind')!r})")
        router = cls(cfg["tasks"], cfg["n_features"], cfg["ngram_range"],
                     cfg["word_ngram_range"], cfg["lowercase"], cfg["max_chars"])
        if state_dict is not None:
            router.load_state_dict(state_dict, strict=True)
        return router.eval()


def _split(n: int, val_fraction: float, gen: torch.Generator) -> Tuple[List[int], List[int]]:
    """(training, held-out) indices of n >= 2 items: at least one of each."""
    perm = torch.randperm(n, generator=gen).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def fit_text_router(texts: Mapping[str, Sequence[str]], n_features: int = 2 ** 18,
                    ngram_range: Sequence[int] = (1, 4),
                    word_ngram_range: Optional[Sequence[int]] = (1, 2),
                    lowercase: bool = False, max_chars: Optional[int] = None,
                    Cs: Sequence[float] = CS,
                    val_fraction: float = 0.2, seed: int = 0,
                    max_items_per_task: Optional[int] = None,
                    max_iter: int = 2000) -> Tuple[TextRouter, Dict[str, Any]]:
    """Fits a TextRouter on each task's texts (task name -> list of str; the order gives the
    logit order).

    Semantics: each task's texts (its first max_items_per_task, if given) are split, seeded,
    into round(n·val_fraction) held-out and the rest training items; idf is fitted on the
    training items; for each C in Cs a LinearSVC is fitted on them, and the C of highest
    held-out accuracy (ties: the first) is kept, with the softmax scale (of `SCALES`) of least
    held-out cross-entropy; the SVM is then refitted on all the items (idf too) and the scale
    folded into its weights. No classes are rebalanced: give every task about as many texts.
    Returns (router in eval mode, report) with report = {"tasks", "kind", "C", "scale",
    "val_accuracy" (of the chosen C, before the refit), "val_accuracy_per_C",
    "val_accuracy_per_task", "n_train", "n_val", "n_items_per_task"}.
    Errors: ValueError for fewer than 2 tasks, a task with fewer than 2 texts (named), or bad
    hyper-parameters (named, with the value); TypeError for texts that are not strings.
    """
    fn = "fit_text_router"
    tasks = _tasks_of(texts, "texts", "list of strings", fn)
    val_fraction = _real_arg(val_fraction, "val_fraction", fn)
    if not 0 < val_fraction < 1:
        raise ValueError(f"{fn}: val_fraction must be in (0, 1), got {val_fraction!r}")
    Cs = [_real_arg(c, "Cs", fn) for c in (Cs if isinstance(Cs, (list, tuple)) else [Cs])]
    if not Cs or any(not c > 0 for c in Cs):
        raise ValueError(f"{fn}: Cs must be a non-empty list of positive numbers, got {Cs!r}")
    seed = _int_arg(seed, "seed", fn, 0)
    max_iter = _int_arg(max_iter, "max_iter", fn, 1)
    if max_items_per_task is not None:
        max_items_per_task = _int_arg(max_items_per_task, "max_items_per_task", fn, 2)
    # Checks those arguments.
    router = TextRouter(tasks, n_features, ngram_range, word_ngram_range, lowercase, max_chars)
    per_task = {}
    for t in tasks:
        items = check_texts(texts[t], fn, f"texts[{t!r}]")[:max_items_per_task]
        if len(items) < 2:
            raise ValueError(f"{fn}: task {t!r} has {len(items)} texts; each task needs at least "
                             f"2 (a training and a held-out one)")
        per_task[t] = items
    gen = torch.Generator().manual_seed(seed)
    tr_x, tr_y, va_x, va_y = [], [], [], []
    for i, t in enumerate(tasks):
        tr, va = _split(len(per_task[t]), val_fraction, gen)
        tr_x += [per_task[t][j] for j in tr]
        tr_y += [i] * len(tr)
        va_x += [per_task[t][j] for j in va]
        va_y += [i] * len(va)
    tr_y, va_y = np.asarray(tr_y), np.asarray(va_y)
    accs, scores = [], []
    for c in Cs:
        weight, bias = _logit_params(_fit(router, tr_x, tr_y, c, max_iter, seed))
        scores.append(np.asarray(router.featurize(va_x) @ weight.T + bias))
        accs.append(float((scores[-1].argmax(1) == va_y).mean()))
    best = int(np.argmax(accs))
    scale = min(SCALES, key=lambda s: _cross_entropy(s * scores[best], va_y))
    pred = scores[best].argmax(1)
    weight, bias = _logit_params(_fit(router, tr_x + va_x, np.concatenate([tr_y, va_y]),
                                      Cs[best], max_iter, seed))
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(scale * weight).float())
        router.bias.copy_(torch.from_numpy(scale * bias).float())
    report = {"tasks": tasks, "kind": "text", "C": Cs[best], "scale": scale,
              "val_accuracy": accs[best], "val_accuracy_per_C": dict(zip(map(float, Cs), accs)),
              "val_accuracy_per_task": {t: float((pred[va_y == i] == i).mean())
                                        for i, t in enumerate(tasks)},
              "n_train": len(tr_x), "n_val": len(va_x),
              "n_items_per_task": {t: len(per_task[t]) for t in tasks}}
    return router.eval(), report


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def _logit_params(model) -> Tuple[np.ndarray, np.ndarray]:
    """(W [T, D], b [T]) of a fitted linear classifier. With two classes scikit-learn keeps one
    row z = w·x + c, positive for class 1; logits (-z/2, z/2) give softmax σ(z)."""
    w, c = model.coef_, model.intercept_
    if w.shape[0] == 1:
        return np.concatenate([-w / 2, w / 2]), np.concatenate([-c / 2, c / 2])
    return w, c


def _fit(router: TextRouter, texts: List[str], labels: np.ndarray, C: float, max_iter: int,
         seed: int):
    """idf from these texts into the router, then a LinearSVC on their features."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.svm import LinearSVC
    idf = [TfidfTransformer(sublinear_tf=True).fit(c).idf_ for c in router.counts(texts)]
    with torch.no_grad():
        router.idf.copy_(torch.from_numpy(np.concatenate(idf)).float())
    return LinearSVC(C=C, max_iter=max_iter, random_state=seed).fit(router.featurize(texts),
                                                                    labels)


class ProductRouter(Router):
    """A hidden-state router's probabilities times a TextRouter's, raised to `alpha`.

    Semantics: logits = log_softmax(states(z)) + alpha · log_softmax(text(texts)), so the
    weights are ∝ p_states · p_text^alpha: a product of experts, each router's confident
    mistakes outvoted where the other is sure. Its features are the pair (z, texts): z the
    pooled hidden states its `states` router reads (its `layer` and `pooling` are that
    router's, so TwinMergedModule computes z as it would for it: a router pass of θs, cut short
    at an early layer, or inside the served pass with routing="self"), texts the rows' texts.
    `fit_product_alpha` chooses alpha on validation items.
    """

    kind = "product"
    reads_text = True

    def __init__(self, states: Router, text: TextRouter, alpha: float = 1.0):
        super().__init__()
        fn = "ProductRouter"
        if not isinstance(states, Router) or getattr(states, "reads_text", False) or \
                type(states).features is not Router.features:
            raise TypeError(f"{fn}: states must be a router on pooled hidden states "
                            f"(TwinRouter, PrototypeRouter), got {type(states).__name__}")
        if not isinstance(text, TextRouter):
            raise TypeError(f"{fn}: text must be a TextRouter, got {type(text).__name__}")
        if list(states.tasks) != list(text.tasks):
            raise ValueError(f"{fn}: states and text must route the same tasks in order, got "
                             f"{list(states.tasks)} and {list(text.tasks)}")
        alpha = _real_arg(alpha, "alpha", fn)
        if not alpha >= 0 or not np.isfinite(alpha):
            raise ValueError(f"{fn}: alpha must be finite and >= 0, got {alpha!r}")
        self.states, self.text, self.alpha = states, text, alpha
        self.tasks = list(states.tasks)
        self.layer, self.pooling = states.layer, states.pooling
        self.in_features = states.in_features

    def _logits(self, features, fn: str) -> Tensor:
        if not isinstance(features, tuple) or len(features) != 2:
            raise TypeError(f"{fn}: features must be the pair (pooled states [B, d], texts), "
                            f"got {type(features).__name__}")
        z, texts = features
        a = torch.log_softmax(self.states._logits(z, fn).float(), dim=-1)
        texts = check_texts(texts, fn, "texts", rows=a.shape[0])
        b = torch.log_softmax(self.text._logits(texts, fn).float(), dim=-1).to(a.device)
        return (a + self.alpha * b).to(self.text.weight.dtype)

    def forward(self, features) -> Tensor:
        return self._logits(features, "ProductRouter.forward")

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "states": self.states.config(), "text": self.text.config(),
                "alpha": self.alpha}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> "ProductRouter":
        from twinmerge_ext.router import router_from_config
        fn = "ProductRouter.from_config"
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{fn}: cfg must be a mapping, got {type(cfg).__name__}")
        if cfg.get("kind") != cls.kind or set(cfg) != {"kind", "states", "text", "alpha"}:
            raise ValueError(f"{fn}: cfg must have exactly the keys ['alpha', 'kind', 'states', "
                             f"'text'] with kind 'product', got {sorted(cfg)} "
                             f"(kind {cfg.get('kind')!r})")
        router = cls(router_from_config(cfg["states"]), TextRouter.from_config(cfg["text"]),
                     cfg["alpha"])
        if state_dict is not None:
            router.load_state_dict(state_dict, strict=True)
        return router.eval()


ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0)


def fit_product_alpha(states: Router, text: TextRouter, val_states: Tensor,
                      val_texts: Sequence[str], val_tasks: Tensor,
                      alphas: Sequence[float] = ALPHAS) -> Tuple[ProductRouter, Dict[str, Any]]:
    """The ProductRouter of these two routers whose alpha routes the validation items best
    (ties: the first in `alphas`). val_states [N, d]: the states router's features of the
    items; val_texts: their N texts; val_tasks [N]: their true task indices.
    Returns (router in eval mode, holding copies of the two, {"alpha", "val_accuracy",
    "val_accuracy_per_alpha"})."""
    fn = "fit_product_alpha"
    val_texts = check_texts(val_texts, fn, "val_texts")
    N = len(val_texts)
    if not isinstance(val_tasks, Tensor) or tuple(val_tasks.shape) != (N,):
        raise ValueError(f"{fn}: val_tasks must be a tensor [N={N}] (one per text), got "
                         f"{_describe(val_tasks)}")
    if not isinstance(val_states, Tensor) or val_states.dim() != 2 or val_states.shape[0] != N:
        raise ValueError(f"{fn}: val_states must be a tensor [N={N}, d] (one row per text), "
                         f"got {_describe(val_states)}")
    alphas = [_real_arg(a, "alphas", fn) for a in alphas]
    if not alphas or not all(np.isfinite(a) and a >= 0 for a in alphas):
        raise ValueError(f"{fn}: alphas must be a non-empty list of finite numbers >= 0, got "
                         f"{alphas!r}")
    with torch.no_grad(), _eval_mode(states):
        a = torch.log_softmax(states(val_states).float(), -1)
        b = torch.log_softmax(text(val_texts).float(), -1).to(a.device)
    tasks = val_tasks.to(a.device)
    accs = [float(((a + x * b).argmax(-1) == tasks).float().mean()) for x in alphas]
    best = int(np.argmax(accs))
    # Copies: the product is put in eval mode, and the caller's routers stay as they are.
    return (ProductRouter(copy.deepcopy(states), copy.deepcopy(text), alphas[best]).eval(),
            {"alpha": alphas[best], "val_accuracy": accs[best],
             "val_accuracy_per_alpha": dict(zip(alphas, accs))})
