"""Upload an export folder to the Hugging Face Hub with huggingface_hub."""

import os
import re


class UploadError(RuntimeError):
    """The upload did not happen (no token, a refused request, no network). The local export
    folder is left as it was."""


_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


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
        raise UploadError(
            f"Could not {step} for {repo_id} on {api.endpoint}: {type(error).__name__}: "
            f"{error}. The export in {folder} is intact; retry the push when the problem is "
            "fixed."
        ) from error
    return getattr(info, "commit_url", str(info))
