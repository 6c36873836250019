"""Upload an export folder to the Hugging Face Hub with huggingface_hub."""

import os
import re


class UploadError(RuntimeError):
    """The upload did not happen (no token, a refused request, no network). The local export
    folder is left as it was."""


_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")

REDACTED = "[redacted]"
# What a server error may echo back of a credential: Hugging Face tokens, Authorization headers and
# key=value pairs, and long hex or base64 strings (keys, signatures, JWTs).
_SECRETS = [
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(\bBearer\s+)[^\s'\",;]+"),
    re.compile(r"(?i)(\b(?:authorization|token|api[_-]?key|password|secret)['\"]?\s*[:=]\s*['\"]?)"
               r"(?:Bearer\s+)?[^\s'\",;&]+"),
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),
]
_BASE64 = re.compile(r"[A-Za-z0-9+/_=.-]{32,}")


def _looks_random(text):
    # Long runs of letters and digits with both cases and digits read as keys; paths and words do not.
    return (any(c.isupper() for c in text) and any(c.islower() for c in text)
            and any(c.isdigit() for c in text) and "/" not in text.strip("/"))


def redact_secrets(text, secrets=()):
    """`text` with anything that looks like a credential replaced by "[redacted]".

    Server errors can echo a request back, headers included. Replaced: the given `secrets` (the token in use),
    Hugging Face tokens (hf_...), "Bearer ..." and "token=..." / "Authorization: ..." values, hex strings of 32+
    characters and base64-like runs of 32+ characters mixing upper case, lower case and digits.

    Args:
        text: str.
        secrets: iterable of str, default (). Exact values to remove wherever they appear.

    Example:
    >>> redact_secrets("401: bad token hf_abcdefghijklmnop for Bearer xyz")
    '401: bad token [redacted] for Bearer [redacted]'
    """
    text = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return _BASE64.sub(lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text)


def parse_repo(uri):
    """"hf://user/name", "user/name" or "name" -> the repo id huggingface_hub takes.

    Example:
    >>> parse_repo("hf://me/dinov2-digits")   # "me/dinov2-digits"
    """
    repo = uri[len("hf://"):] if uri.startswith("hf://") else uri
    repo = repo.strip("/")
    if "://" in uri and not uri.startswith("hf://"):
        raise ValueError(f"`push` must be an hf://user/repo handle, received {uri!r}.")
    if not _REPO.match(repo):
        raise ValueError(
            f"`push` must look like hf://user/repo (letters, digits, '-', '_', '.'), received "
            f"{uri!r}."
        )
    return repo


def push_to_hub(folder, repo, private=False, revision=None, commit_message=None, token=None,
                endpoint=None):
    """Uploads every file of `folder` to a Hub model repository, creating the repo if needed.

    The token comes from `token`, else the HF_TOKEN environment variable, else the token file
    `hf auth login` writes (huggingface_hub's standard lookup). A missing token, a refused
    request or a network failure raises `UploadError` with what to do; nothing in `folder` is
    touched, so the upload can simply be retried.

    Args:
        folder: str. The export folder.
        repo: str. "hf://user/name" or "user/name".
        private: bool, default False. Create the repository as private (an existing
            repository keeps its visibility).
        revision: optional str. Branch to commit to (created from main if missing).
        commit_message: optional str.
        token: optional str.
        endpoint: optional str. Hub URL (default: HF_ENDPOINT or huggingface.co).

    Returns:
        str: the URL of the commit.

    Example:
    >>> push_to_hub("export/keras_hub", "hf://me/dinov2-digits", private=True)
    """
    import huggingface_hub

    repo_id = parse_repo(repo)
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise UploadError(f"Nothing to upload: {folder!r} is not a folder with files.")
    token = token or huggingface_hub.get_token()
    if not token:
        token_file = huggingface_hub.constants.HF_TOKEN_PATH
        raise UploadError(
            f"No Hugging Face token: set HF_TOKEN or run `hf auth login` (which writes "
            f"{token_file}), then upload again. The export in {folder} is intact; to upload it "
            f"later: `hf upload {repo_id} {folder} .`"
        )
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {os.path.basename(os.path.normpath(folder))} (keras-dinov2)"
    step = "create the repository"
    try:
        # None keeps the namespace default (an organization may default to private).
        api.create_repo(repo_id, private=True if private else None, exist_ok=True,
                        repo_type="model")
        if revision and revision != "main":
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "upload the files"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 revision=revision, commit_message=message)
    except Exception as error:  # any failure of the network boundary becomes one clear error
        # The server's text is shown, never a credential it may echo back.
        reason = redact_secrets(error, secrets=[token])
        raise UploadError(
            f"Could not {step} for {repo_id} on {api.endpoint}: {type(error).__name__}: "
            f"{reason}. The export in {folder} is intact; retry the push when the problem is "
            "fixed."
        ) from None
    return getattr(info, "commit_url", str(info))
