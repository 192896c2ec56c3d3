"""The ranker: a cross-encoder reading `[CLS] context [SEP] item` and giving one logit.

r̂ = sigmoid(logit) is the probability of a click or purchase; training minimises binary
cross-entropy over the positive and its sampled negatives (docs/DESIGN.md), or, as the option for
ranking metrics, a softmax over each group with the positive first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoprank.config import Config
from shoprank.data.tokenize import pair_tokens
from shoprank.models.encoder import (
    apply_lora,
    load_sequence_scorer,
    load_tokenizer,
    trimmed_length,
)
from shoprank.models.export_meta import read_export
from shoprank.precision import ranker_backend

PRECISIONS = ("auto", "fp32", "bf16", "int8", "onnx", "onnx-int8")

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def build_ranker(cfg: Config) -> nn.Module:
    model = load_sequence_scorer(cfg.model.name, cfg.model)
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


def flatten_groups(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[B, G, L] token tensors to [B*G, L'], trimmed (`encoder.trimmed_length`)."""
    length = trimmed_length(batch["attention_mask"])
    return {
        k: batch[k].reshape(-1, batch[k].shape[-1])[:, :length].long()
        for k in TOKEN_KEYS
        if k in batch
    }


def ranker_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits shaped like the labels, [B, G]."""
    b, g = batch["labels"].shape
    return model(**flatten_groups(batch)).logits.float().view(b, g)


def ranker_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        # ℓ = −[r·log r̂ + (1−r)·log(1−r̂)], averaged over every (context, item) pair.
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind == "listwise":
        return F.cross_entropy(logits, labels.argmax(dim=1))
    raise ValueError(f"train.loss={kind!r}: use 'bce' or 'listwise'")


def load_for_inference(model_dir: str, precision: str) -> nn.Module | OnnxRanker:
    """An exported ranker ready to score: fp32, bf16 weights (the fastest batch throughput on
    AMX CPUs and GPUs), int8 dynamic quantization of its linear layers (CPU), or the same
    network in ONNX Runtime (fp32, or its own int8 dynamic quantization; CPU). auto: bf16 where
    the device computes it natively, else ONNX Runtime fp32 on a CPU (precision.ranker_backend)."""
    from transformers import AutoModelForSequenceClassification

    if precision not in PRECISIONS:
        raise ValueError(f"ranker precision {precision!r}: use one of {PRECISIONS}")
    precision = ranker_backend(precision)
    if precision.startswith("onnx"):
        return OnnxRanker.export(model_dir, quantize=precision == "onnx-int8")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # Eager attention, as in training: on CPU it scored 20 pairs of 128 tokens in 150-164 ms
    # where SDPA took 151-230 ms (bf16, 2 threads, interleaved rounds).
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager"
    ).eval()
    if precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model


# Where ONNX exports of ranker folders are kept between processes, keyed by the folder's
# weights (hashed): every scorer actor and Serve replica of the same export loads one file
# instead of re-exporting (seconds of tracing each). Safe to delete; SHOPRANK_CACHE moves it.
CACHE_ENV = "SHOPRANK_CACHE"
ONNX_CACHE_KEEP = 16  # the most recently used exports kept; older ones are removed
ONNX_EXPORT_VERSION = 1  # part of the key: raise it when _export_onnx changes what it writes


def onnx_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shoprank") / "onnx"


def onnx_key(model_dir: str, quantize: bool) -> str:
    """A hash of what the export depends on: the folder's config and weight files' bytes, the
    torch and onnxruntime versions, the exporter's version here and the quantization."""
    import onnxruntime as ort

    versions = f"{torch.__version__} {ort.__version__} {ONNX_EXPORT_VERSION} {quantize}"
    digest = hashlib.sha256(versions.encode())
    for path in sorted(Path(model_dir).iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


class OnnxRanker:
    """The exported cross-encoder as an ONNX Runtime session, called like the transformers
    model it came from (`model(**tensors).logits`), so `Ranker` scores through it unchanged.

    Exported with torch's dynamo exporter (dynamic batch and length; the TorchScript exporter
    froze the attention mask's padding logic to the example's shape) into the cache above, not
    beside the weights: registry folders stay read-only. ORT uses torch's thread count."""

    device = torch.device("cpu")

    def __init__(self, path: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.path = path

    @classmethod
    def export(cls, model_dir: str, quantize: bool = False) -> OnnxRanker:
        """The cached export of `model_dir` when there is one, else a new one, cached."""
        cache = onnx_cache()
        folder = cache / onnx_key(model_dir, quantize)
        if not (folder / "ranker.onnx").exists():
            cache.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
            _export_onnx(model_dir, staging / "ranker.onnx", quantize)
            try:
                staging.rename(folder)  # atomic; a process that got there first wins
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
            _prune(cache)
        os.utime(folder)  # most recently used
        return cls(str(folder / "ranker.onnx"))

    def __call__(self, **tensors: torch.Tensor) -> SimpleNamespace:
        feed = {k: v.numpy().astype(np.int64) for k, v in tensors.items() if k in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))


class Ranker:
    """Cross-encoder inference: one logit per (context, item) pair.

    The one scorer behind training-time validation (`score_tokens` on the engine's module),
    evaluation (Ray Data actors holding one) and the Serve app (`score` on texts): the same
    pair encoding (`data.tokenize.pair_tokens`), the same weights at the same precision.
    """

    # Pairs a forward pass: on 2 CPU cores in bf16, passes of 64 pairs of 128 tokens ran at
    # two thirds the pairs/s of passes of 16-32 (RESULTS.md, "BLAS threads").
    BATCH_SIZE = 32

    def __init__(
        self, model: nn.Module, tokenizer=None, max_length: int = 128, batch_size: int = BATCH_SIZE
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.precision = "fp32"  # what it computes in (from_export: the resolved choice)

    @classmethod
    def from_export(
        cls,
        directory: str,
        precision: str = "fp32",
        batch_size: int = BATCH_SIZE,
        max_length: int | None = None,
    ) -> Ranker:
        """`max_length`: pairs cut shorter than the export was trained with (cheaper, and its
        quality measured with eval.ranker_max_length); None = as trained."""
        meta = read_export(directory, kind="ranker")
        backend = ranker_backend(precision)  # auto resolved once, here
        model = load_for_inference(directory, backend)
        # int8 and ONNX Runtime run on the CPU only; fp32 and bf16 go to a GPU if given.
        if backend in ("fp32", "bf16") and torch.cuda.is_available():
            model = model.to("cuda")
        ranker = cls(model, load_tokenizer(directory), max_length or meta.max_length, batch_size)
        ranker.precision = backend
        return ranker

    @property
    def device(self) -> torch.device:
        return self.model.device

    def score_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, G, L] token groups -> [B, G] fp32 logits, in passes of `batch_size` pairs (a
        validation batch holds a few groups of 100 candidates), each trimmed to its longest row."""
        b, g = batch["input_ids"].shape[:2]
        flat = flatten_groups(batch)
        logits = []
        for start in range(0, b * g, self.batch_size):
            rows = {k: v[start : start + self.batch_size] for k, v in flat.items()}
            length = trimmed_length(rows["attention_mask"])
            logits.append(self.model(**{k: v[:, :length] for k, v in rows.items()}).logits)
        return torch.cat(logits).float().view(b, g)

    @torch.inference_mode()
    def score(self, contexts: list[str], items: list[str]) -> np.ndarray:
        """One logit per pair, in the given order. Pairs go through in batches of similar
        length (sorted by characters), so short pairs do not pay for long ones' padding."""
        if len(contexts) != len(items):
            raise ValueError(f"{len(contexts)} contexts for {len(items)} items")
        order = np.argsort([len(c) + len(i) for c, i in zip(contexts, items, strict=True)])
        out = np.empty(len(items), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            tok = pair_tokens(
                self.tokenizer,
                [contexts[r] for r in rows],
                [items[r] for r in rows],
                self.max_length,
                pad=False,
            )
            tensors = {k: torch.from_numpy(v).long().to(self.device) for k, v in tok.items()}
            out[rows] = self.model(**tensors).logits.float().view(-1).cpu().numpy()
        return out


def _export_onnx(model_dir: str, out: Path, quantize: bool) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    example = {
        "input_ids": torch.tensor([[101, 2000, 102, 2001, 102], [101, 2000, 102, 2001, 0]]),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    }
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2)
    # The exporter's notes (dynamic-shape renames, torchvision ops it skips) and ORT's advice to
    # pre-process before quantizing are not the user's business.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (),
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_shapes={k: {0: batch, 1: length} for k in example},
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    if not quantize:
        program.save(str(out))
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = out.with_name("plain.onnx")
    program.save(str(plain))
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    plain.unlink()  # only the quantized file is served


def _prune(cache: Path, keep: int = ONNX_CACHE_KEEP) -> None:
    """Remove all but the `keep` most recently used exports."""
    folders = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)
