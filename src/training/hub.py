"""The Hugging Face Hub: whether it can be reached, and uploading a saved or exported run folder.

Used by training (``push_to_hub``: checked before training, pushed after the final save) and by
``train_sft.py export --push_to_hub``; it imports nothing of the trainers, so both can import it.
"""

from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils import get_session

# What a run folder holds besides the model: checkpoints (optimizer states, RNG), the run's lock and marker, an
# unfinished save, tracker logs and generated evaluation answers. The hub gets the model only.
NOT_UPLOADED = ("checkpoint-*", "checkpoint-*/**", ".sft_run*", ".saving*", ".saving*/**", "runs/**",
                "eval_generations.jsonl", "*.lock")


HUB_TIMEOUT_S = 5.0


def hub_endpoint() -> str:
    """The hub the upload would go to: ``huggingface_hub``'s configured endpoint (``HF_ENDPOINT``)."""
    return constants.ENDPOINT


def probe_hub(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """``None`` when ``endpoint`` answers a HEAD request within ``timeout`` seconds (with any status below 500);
    otherwise why not, in a few words. Uses ``huggingface_hub``'s own HTTP session (its proxies and headers)."""
    try:
        response = get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # connection refused, DNS, timeout, proxy: whatever the installed HTTP client raises
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first}"[:200]
    if response.status_code >= 500:
        return f"it answered HTTP {response.status_code}"
    return None


def check_hub_reachable(repo_id: str, folder: str) -> None:
    """Refuse a push that cannot happen (offline, or the hub unreachable), before the work whose result it would
    upload: ``HF_HUB_OFFLINE`` set (now, or when ``huggingface_hub`` was imported: its session then refuses every
    request), or no answer from the hub endpoint within :data:`HUB_TIMEOUT_S` seconds."""
    later = f"run without pushing, then upload the folder when online: huggingface-cli upload {repo_id} {folder}"
    offline = os.environ.get("HF_HUB_OFFLINE")
    if offline == "1" or constants.HF_HUB_OFFLINE:  # the constant: huggingface_hub's reading of it at import
        raise ValueError(f"cannot push {folder} to the hub repository {repo_id!r}: HF_HUB_OFFLINE={offline or '1'} is set "
                         "(offline); " + later)
    endpoint = hub_endpoint()
    reason = probe_hub(endpoint)
    if reason is not None:
        raise ValueError(f"cannot push {folder} to the hub repository {repo_id!r}: the hub at {endpoint} is unreachable "
                         f"(offline? {reason}; checked with a {HUB_TIMEOUT_S:g} s timeout); " + later)


def push_folder(folder: str, repo_id: str, private: bool = True) -> str:
    """Upload a saved or exported folder to the Hugging Face Hub (``huggingface_hub``); a clear error offline."""
    check_hub_reachable(repo_id, folder)
    api = huggingface_hub.HfApi()  # looked up at the call: tests put a recorder in its place
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model saved by arabic-qwen-sft",
                          ignore_patterns=list(NOT_UPLOADED))
    except Exception as exc:  # network, authentication and permission errors of the hub client
        raise ValueError(f"could not push {folder} to the hub repository {repo_id!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; the exported folder is kept") from None
    return f"https://huggingface.co/{repo_id}"
