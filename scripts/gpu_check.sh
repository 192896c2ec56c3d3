#!/usr/bin/env bash
# The GPU path, checked end to end on a machine with NVIDIA GPUs (CI never runs this):
#   1. install with the CUDA build of torch (scripts/install.sh, TORCH_CUDA);
#   2. train the ranker on the bundled MiniLM and the synthetic shop: WORKERS Ray Train workers,
#      one GPU each, DeepSpeed ZeRO-3, LoRA, bf16, STEPS optimizer steps; export; register;
#   3. logit parity: the export (LoRA merged) scores as the trained checkpoint did (unmerged),
#      and the checkpoint records ZeRO-3 / bf16 / LoRA on WORKERS workers;
#   4. a retriever for stage one (a few steps, one GPU), registered;
#   5. the Serve app (serve/synthetic.yaml's, the Models replica on a GPU) answers /recommend
#      and /score, and /score's scores are the export's own (fp32, within 1e-4).
# Exits non-zero at the first failed check.
#   bash scripts/gpu_check.sh                        # defaults below
#   WORKERS=4 STEPS=50 TORCH_CUDA=cu126 OUT=/tmp/x bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-2}
STEPS=${STEPS:-20}
TORCH_CUDA=${TORCH_CUDA:-cu126}
OUT=${OUT:-/tmp/shoprank-gpu-check}
PORT=${PORT:-8000}
PY=.venv/bin/python

say() { echo "[gpu_check] $*"; }
fail() {
    echo "[gpu_check] FAILED: $*" >&2
    exit 1
}

if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "[gpu_check] nvidia-smi not found: this check needs a machine with NVIDIA GPUs and" \
        "their driver (it trains with train.use_gpu=true); nothing was run" >&2
    exit 2
fi
GPUS=$(nvidia-smi --list-gpus | grep -c '^GPU ' || true)
if [ "$GPUS" -lt "$WORKERS" ]; then
    fail "WORKERS=$WORKERS needs $WORKERS GPUs, nvidia-smi lists $GPUS (WORKERS=1 checks one" \
        "GPU, where ZeRO has nothing to shard and stage 0 runs)"
fi
say "$GPUS GPU(s): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
rm -rf "$OUT"
mkdir -p "$OUT"

say "1/5 install (torch $TORCH_CUDA)"
TORCH_CUDA=$TORCH_CUDA bash scripts/install.sh
"$PY" -c "
import torch
assert torch.cuda.is_available(), 'torch sees no GPU: ' + torch.__version__
assert torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0)
print('[gpu_check] torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))
" || fail "the CUDA build of torch does not work here"

COMMON=(
    "run.storage=$OUT/runs"
    "registry.root=$OUT/registry"
    "train.use_gpu=true"
    "train.max_steps=$STEPS"
    "train.eval_every_steps=$STEPS"
)
say "2/5 train the ranker: $WORKERS workers x 1 GPU, ZeRO-3, LoRA, bf16, $STEPS steps"
"$PY" jobs/train.py "${COMMON[@]}" run.name=gpu-ranker "train.num_workers=$WORKERS" \
    train.zero_stage=3 train.bf16=true lora.enabled=true 2>&1 | tee "$OUT/train-ranker.log" ||
    fail "ranker training (log: $OUT/train-ranker.log)"
[ -f "$OUT/runs/gpu-ranker/export/shoprank.json" ] || fail "no export in $OUT/runs/gpu-ranker"

say "3/5 logit parity: export vs checkpoint"
"$PY" - "$OUT/runs/gpu-ranker" "$WORKERS" << 'EOF' || fail "logit parity"
import json
import sys
from pathlib import Path

from shoprank.config import load_config
from shoprank.models.export_meta import read_export
from shoprank.models.ranker import Ranker
from shoprank.serving.services import item_texts, read_catalog
from shoprank.train.export import load_checkpoint_model
from shoprank.train.loop import TrainState

run, workers = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config(str(run / "config.yaml"), [])
export = run / "export"
step = json.loads((export / "shoprank.json").read_text())["metrics"]["step"]
checkpoint = next(
    c for c in sorted(run.glob("checkpoint_*")) if TrainState.load(str(c)).step == step
)
setup = TrainState.load(str(checkpoint)).setup
expected = {"workers": workers, "zero_stage": 3 if workers > 1 else 0, "bf16": True}
got = {k: setup[k] for k in expected}
assert got == expected, f"the run trained with {got}, not {expected}"
assert setup["lora_targets"], "no LoRA layers in the trained model"

texts = item_texts(read_catalog(cfg.data.catalog), read_export(export, kind="ranker"))
items = list(texts.values())[:65]
pairs = zip(items[:64], items[1:], strict=True)
contexts = [f"{a}{cfg.data.history_separator}{b}" for a, b in pairs]
unmerged = load_checkpoint_model(str(checkpoint), cfg, merge=False).to("cuda")
exported = Ranker.from_export(str(export), "fp32")
assert exported.device.type == "cuda", exported.device
a = Ranker(unmerged, exported.tokenizer, exported.max_length).score(contexts, items[:64])
b = exported.score(contexts, items[:64])
worst = float(abs(a - b).max())
print(
    f"[gpu_check] checkpoint {checkpoint.name} (step {step}, {got}): export logits within "
    f"{worst:.2e} of the checkpoint's over {len(a)} pairs (spread {float(abs(b).max()):.3f})"
)
assert worst <= 1e-4, worst
EOF

say "4/5 train a retriever for stage one (1 GPU, $STEPS steps)"
"$PY" jobs/train.py --config configs/synthetic-retriever.yaml "${COMMON[@]}" \
    run.name=gpu-retriever train.num_workers=1 eval.blend_trials=0 2>&1 |
    tee "$OUT/train-retriever.log" || fail "retriever training (log: $OUT/train-retriever.log)"

say "5/5 serve: /recommend and /score on the GPU-trained models"
"$PY" - "$OUT" "$PORT" << 'EOF' || fail "serve config"
import sys
from pathlib import Path

import yaml

out, port = sys.argv[1], int(sys.argv[2])
config = yaml.safe_load(Path("serve/synthetic.yaml").read_text())
config["http_options"] = {"host": "127.0.0.1", "port": port}
app = config["applications"][0]
app["args"].update(
    registry=f"{out}/registry",
    retriever="gpu-retriever",
    ranker="gpu-ranker",
    rerank_top=20,
    ranker_precision="fp32",
    retriever_precision="fp32",
)
for deployment in app.get("deployments", []):
    if deployment["name"] == "Models":  # both encoders' replica: on a GPU
        deployment["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
Path(out, "serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
EOF
SHOPRANK_API_KEYS=$("$PY" -c "import secrets; print(secrets.token_urlsafe(24))")
export SHOPRANK_API_KEYS
.venv/bin/serve run "$OUT/serve.yaml" > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -INT $SERVE_PID 2> /dev/null || true; wait $SERVE_PID 2> /dev/null || true' EXIT
"$PY" - "$OUT" "$PORT" << 'EOF' || fail "serving (log: $OUT/serve.log)"
import os
import sys
import time

import httpx
import numpy as np

from shoprank.models.export_meta import read_export
from shoprank.models.ranker import Ranker
from shoprank.serving.services import item_texts, read_catalog

out, port = sys.argv[1], int(sys.argv[2])
url, key = f"http://127.0.0.1:{port}", os.environ["SHOPRANK_API_KEYS"]
deadline = time.monotonic() + 300
while True:
    try:
        if httpx.get(f"{url}/healthz", timeout=5).json().get("status") == "ok":
            break
    except (httpx.HTTPError, ValueError):
        pass
    if time.monotonic() > deadline:
        sys.exit("the app was not healthy after 300 s")
    time.sleep(2)
headers = {"x-api-key": key}
export = f"{out}/runs/gpu-ranker/export"
catalog = read_catalog("data/synthetic/catalog.parquet")
ids = catalog["item_id"].to_pylist()[:20]
context = "cordless drill | safety goggles"
got = httpx.post(
    f"{url}/score", json={"context": context, "item_ids": ids}, headers=headers, timeout=60
)
assert got.status_code == 200, (got.status_code, got.text)
served = np.array(got.json()["scores"], dtype=np.float32)
texts = item_texts(catalog, read_export(export, kind="ranker"))
offline = Ranker.from_export(export, "fp32").score([context] * len(ids), [texts[i] for i in ids])
worst = float(np.abs(served - offline).max())
print(f"[gpu_check] /score: {len(ids)} served scores within {worst:.2e} of the export's own")
assert worst <= 1e-4, worst
body = {"history": ids[:3], "k": 5}
got = httpx.post(f"{url}/recommend", json=body, headers=headers, timeout=60)
assert got.status_code == 200, (got.status_code, got.text)
assert len(got.json()["items"]) == 5, got.json()
print(f"[gpu_check] /recommend after {ids[:3]}: {[i['item_id'] for i in got.json()['items']]}")
EOF
say "all checks passed (outputs in $OUT)"
