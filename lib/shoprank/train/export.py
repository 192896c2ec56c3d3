"""Export: the best checkpoint as a plain Hugging Face folder that needs neither DeepSpeed
nor peft to load (LoRA merged into the weights), with a metadata file saying where it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from torch import nn

from shoprank import __version__
from shoprank.config import Config
from shoprank.data import read
from shoprank.models.encoder import load_encoder, load_sequence_scorer, load_tokenizer
from shoprank.models.export_meta import METADATA
from shoprank.models.retriever import SETTINGS
from shoprank.precision import describe
from shoprank.train.loop import MODEL_DIR

__all__ = ["METADATA", "code_version", "export_model", "export_run", "load_checkpoint_model"]


def code_version() -> dict:
    """Package version and, when run from a git checkout, the commit and whether it was dirty."""
    here = Path(__file__).resolve().parent
    info: dict = {"shoprank": __version__}
    git = shutil.which("git")
    if git:
        run = subprocess.run(
            [git, "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        if run.returncode == 0:
            info["commit"] = run.stdout.strip()
            status = subprocess.run(
                [git, "-C", str(here), "status", "--porcelain"], capture_output=True, text=True
            )
            info["dirty"] = bool(status.stdout.strip())
    return info


def load_checkpoint_model(checkpoint_dir: str, cfg: Config, merge: bool = True) -> nn.Module:
    """The trained network saved in a checkpoint: the ranker, or the retriever's encoder.

    LoRA adapters are merged into the base weights when `merge`.
    """
    model_dir = os.path.join(checkpoint_dir, MODEL_DIR)
    retriever = cfg.model.kind == "retriever"

    def load(path: str) -> nn.Module:
        if retriever:
            return load_encoder(cfg.model, path)
        return load_sequence_scorer(path, cfg.model)

    if not cfg.lora.enabled:
        return load(model_dir).eval()
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(cfg.model.name), model_dir)
    return (model.merge_and_unload() if merge else model).eval()


def export_model(checkpoint_dir: str, cfg: Config, out_dir: str, metadata: dict) -> str:
    """Write `out_dir` with weights, tokenizer and `shoprank.json`; returns the folder."""
    model = load_checkpoint_model(checkpoint_dir, cfg, merge=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    load_tokenizer(cfg.model.name).save_pretrained(out_dir)
    meta = {
        "kind": cfg.model.kind,
        "base_model": cfg.model.name,
        "max_length": cfg.model.max_length,
    }
    if cfg.model.kind == "retriever":
        with open(os.path.join(checkpoint_dir, MODEL_DIR, SETTINGS)) as f:
            meta.update(json.load(f))  # pooling and the (learned) temperature
        meta["context_max_length"] = cfg.retriever.context_max_length
        meta["item_max_length"] = cfg.model.max_length
    meta.update({"config": cfg.model_dump(mode="json"), "code": code_version(), **metadata})
    # What train.precision resolved to where the job ran (the host's check, for the record).
    meta["precision"] = {"trained_in": "bf16" if cfg.train.bf16 else "fp32", **describe()}
    with open(os.path.join(out_dir, METADATA), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    return out_dir


def export_run(run, checkpoint, best: dict, out_dir: Path, **metadata) -> str:
    """A training checkpoint of `run` as a plain Hugging Face folder, with where it came from:
    its metrics, every logged step, the data snapshot and its quality counts."""
    cfg = run.cfg
    with checkpoint.as_directory() as ckpt_dir:
        return export_model(
            ckpt_dir,
            cfg,
            str(out_dir),
            {
                "metrics": best,
                "data": {p: read.snapshot([p]) for p in (cfg.data.catalog, cfg.data.events)},
                "data_quality": run.data.counts,
                "history": run.history,
                "steps": run.steps,
                **metadata,
            },
        )
