"""What a job prints: its own lines once each, progress per phase, no foreign warning floods.

`quiet()` runs wherever our code runs (the driver, each Ray Train worker, each scoring actor).
It filters the warnings libraries raise about their own internals, which a user can do nothing
about, and sets the environment that keeps Ray's console to one copy of each line. Processes
that a local Ray starts inherit that environment (PYTHONWARNINGS included), so Ray's own actors
are quiet too.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import warnings
from pathlib import Path

# (start of the message, builtin category): raised inside libraries, about libraries, on every
# step or call. Literal prefixes, as PYTHONWARNINGS takes them (no commas or colons).
FOREIGN_WARNINGS: list[tuple[str, str]] = [
    # DeepSpeed's ZeRO collectives call torch.distributed functions torch 2.13 deprecates.
    ("`torch.distributed.all_gather_into_tensor` is deprecated", "FutureWarning"),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", "FutureWarning"),
    # transformers asks peft / DeepSpeed for a renamed attribute.
    ("`is_gradient_checkpointing` is deprecated", "FutureWarning"),
    # Ray Data hands read-only Arrow buffers to torch.from_numpy; nothing writes to them.
    ("The given NumPy array is not writable", "UserWarning"),
    # Ray Train's own DatasetManager passes an option Ray Data renamed in 2.60.
    ("`ExecutionOptions.exclude_resources` is deprecated", "DeprecationWarning"),
]

ENVIRONMENT = {
    # No phoning home from a closed network.
    "RAY_USAGE_STATS_ENABLED": "0",
    # No tokenizer thread pools fighting Ray workers for the cores.
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train V2 tees every worker `print` into a logger that writes to stderr as well as
    # stdout, so the driver showed each worker line twice. Ray propagates this to the workers.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Data's console shows warnings only; its INFO lines (plans, progress dumps every 10 s
    # where stdout is not a terminal) stay in its log file. Progress bars on a terminal stay.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # transformers' loading report ("newly initialized: classifier") on every model load in
    # every worker: the classifier head is new by design.
    "TRANSFORMERS_VERBOSITY": "error",
    # ... and its "Loading weights" / "Writing model shards" bars, a pair per load and save.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    rules = [f"ignore:{message}:{category}" for message, category in FOREIGN_WARNINGS]
    current = [r for r in os.environ.get("PYTHONWARNINGS", "").split(",") if r]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [r for r in rules if r not in current])
    for message, category in FOREIGN_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=re.escape(message), category=getattr(builtins, category)
        )


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train's INFO lines ("Checkpoint successfully created",
    "Reporting training result" with the whole report) repeat what the loop logs itself at each
    validation. One of its loggers is named by its file path, hence the match on the path."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


class HideNotices(logging.Filter):
    """Ray Data console filter (ray_data_logging.yaml): drops notices about settings we chose."""

    NOTICES = ("Progress bars disabled",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def log(message: str) -> None:
    """One line of a job's own output, flushed at once so it interleaves with Ray's in order."""
    print(f"[shoprank] {message}", flush=True)


quiet()


_SECRET_PARAM = re.compile(r"(?i)(key|secret|token|password|passwd|signature|credential)")


def redact(uri: str) -> str:
    """A path or URI as it may be shown: no user:password@ and no secret-looking query values
    (s3://KEY:SECRET@bucket/x?session_token=... -> s3://***@bucket/x?session_token=***)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urlencode(
        [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
